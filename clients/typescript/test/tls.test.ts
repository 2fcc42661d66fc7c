/**
 * TLS: the daemon here speaks plaintext on its socket, so a TLS endpoint in
 * front of it (a terminating proxy on loopback, with a test certificate for
 * localhost, valid 2000 to 2199) stands in for a daemon served with TLS.
 */

import assert from "node:assert/strict";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { connect as connectUnix, type AddressInfo, type Socket } from "node:net";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { createServer } from "node:tls";

import { credentials } from "@grpc/grpc-js";
import { Client, ConfigurationError, UnavailableError } from "@legato/client";

import { PACKAGE_ROOT, startLegato, type Legato } from "./support/legato.js";

const certificatePath = join(PACKAGE_ROOT, "test", "fixtures", "localhost.crt");
const keyPath = join(PACKAGE_ROOT, "test", "fixtures", "localhost.key");
const certificate = readFileSync(certificatePath);
const key = readFileSync(keyPath);

/** A TLS endpoint on loopback for the daemon's socket; with `mutual`, it requires a client certificate. */
async function tlsProxy(t: TestContext, legato: Legato, mutual = false): Promise<string> {
  const socketPath = legato.daemon.address.slice("unix:".length);
  const sockets = new Set<Socket>();
  const proxy = createServer(
    { key, cert: certificate, ALPNProtocols: ["h2"], requestCert: mutual, rejectUnauthorized: mutual, ca: certificate },
    (secure) => {
      const plain = connectUnix(socketPath);
      for (const socket of [secure, plain]) {
        sockets.add(socket);
        socket.on("error", () => {});
        socket.on("close", () => {
          sockets.delete(socket);
          secure.destroy();
          plain.destroy();
        });
      }
      secure.pipe(plain).pipe(secure);
    },
  );
  proxy.on("tlsClientError", () => {});
  proxy.listen(0, "127.0.0.1");
  await once(proxy, "listening");
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    proxy.close();
  });
  return `localhost:${(proxy.address() as AddressInfo).port}`;
}

test("with tlsCa the client verifies the daemon's certificate and gets through; otherwise not", async (t) => {
  const legato = await startLegato(t);
  const address = await tlsProxy(t, legato);
  const apiKey = legato.daemon.adminKey;

  for (const tlsCa of [certificatePath, certificate]) {
    const client = await Client.connect({ address, apiKey, tlsCa });
    try {
      const handle = await client.delegate("@researcher", "sent over TLS");
      assert.equal((await client.getTask(handle.id)).content, "sent over TLS");
    } finally {
      client.close();
    }
  }

  // Plaintext to a TLS endpoint, and TLS that trusts only the system's CAs.
  for (const others of [{}, { credentials: credentials.createSsl() }]) {
    await assert.rejects(Client.connect({ address, apiKey, connectTimeoutMs: 2_000, ...others }), UnavailableError);
  }
});

test("LEGATO_TLS_CA does what tlsCa does", async (t) => {
  const legato = await startLegato(t);
  const address = await tlsProxy(t, legato);
  process.env.LEGATO_TLS_CA = certificatePath;
  t.after(() => delete process.env.LEGATO_TLS_CA);
  const client = await Client.connect({ address, apiKey: legato.daemon.adminKey });
  assert.equal((await client.whoami()).name, "admin");
  client.close();
});

test("a daemon that requires a client certificate lets in the client with tlsCert and tlsKey", async (t) => {
  const legato = await startLegato(t);
  const address = await tlsProxy(t, legato, true);
  const apiKey = legato.daemon.adminKey;

  const client = await Client.connect({ address, apiKey, tlsCa: certificatePath, tlsCert: certificatePath, tlsKey: keyPath });
  assert.equal((await client.whoami()).name, "admin");
  client.close();

  await assert.rejects(
    Client.connect({ address, apiKey, tlsCa: certificatePath, connectTimeoutMs: 2_000 }),
    UnavailableError,
  );
  assert.throws(() => new Client({ address, apiKey, tlsCert: certificatePath }), ConfigurationError);
  assert.throws(() => new Client({ address, apiKey, tlsCa: "/nonexistent/ca.pem" }), /cannot read the CA certificate/);
});
