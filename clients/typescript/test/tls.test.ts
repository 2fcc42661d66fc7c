/**
 * TLS: the daemon speaks plaintext on its socket, so a TLS endpoint in front
 * of it (here a terminating proxy on loopback, with a test certificate for
 * localhost) stands in for a daemon with TLS. With `ca` the client verifies
 * it and gets through; in plaintext, or trusting only the system's roots, it does not.
 */

import assert from "node:assert/strict";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { connect as connectUnix, type AddressInfo, type Socket } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { createServer } from "node:tls";

import { credentials } from "@grpc/grpc-js";
import { Client, UnavailableError } from "@legato/client";

import { PACKAGE_ROOT, startLegato } from "./support/legato.js";

const fixtures = join(PACKAGE_ROOT, "test", "fixtures");
const certificate = readFileSync(join(fixtures, "localhost.crt"));
const key = readFileSync(join(fixtures, "localhost.key"));

test("with `ca`, the client reaches the daemon through a TLS endpoint; without it, not", async (t) => {
  const legato = await startLegato(t);
  const socketPath = legato.daemon.address.slice("unix:".length);
  const sockets = new Set<Socket>();
  const proxy = createServer({ key, cert: certificate, ALPNProtocols: ["h2"] }, (secure) => {
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
  });
  proxy.listen(0, "127.0.0.1");
  await once(proxy, "listening");
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    proxy.close();
  });
  const address = `localhost:${(proxy.address() as AddressInfo).port}`;

  const client = await Client.connect({ address, apiKey: legato.daemon.adminKey, ca: certificate });
  try {
    assert.equal((await client.whoami()).name, "admin");
    const handle = await client.delegate("@researcher", "sent over TLS");
    assert.equal((await client.getTask(handle.id)).content, "sent over TLS");
  } finally {
    client.close();
  }

  // Plaintext to a TLS endpoint, and TLS that trusts only the system's roots.
  for (const others of [{}, { credentials: credentials.createSsl() }]) {
    await assert.rejects(
      Client.connect({ address, apiKey: legato.daemon.adminKey, connectTimeoutMs: 2_000, ...others }),
      UnavailableError,
    );
  }
});
