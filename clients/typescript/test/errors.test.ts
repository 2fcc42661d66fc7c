/**
 * Errors: every gRPC status maps to its class in one place, and the daemon's
 * refusals arrive as those classes.
 */

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { Metadata, type ServiceError } from "@grpc/grpc-js";
import {
  Client,
  ConfigurationError,
  LegatoError,
  NotFoundError,
  PermissionDeniedError,
  RpcError,
  Status,
  UnauthenticatedError,
  UnavailableError,
  UnknownError,
  errorClassFor,
  fromServiceError,
  statusName,
} from "@legato/client";

import { startLegato } from "./support/legato.js";

function serviceError(code: Status, details: string): ServiceError {
  return Object.assign(new Error(`${code} ${statusName(code)}: ${details}`), {
    code,
    details,
    metadata: new Metadata(),
  });
}

const EVERY_ERROR_STATUS = Object.values(Status).filter(
  (code): code is Status => typeof code === "number" && code !== Status.OK,
);

test("every gRPC status code maps to its own RpcError subclass", () => {
  assert.equal(EVERY_ERROR_STATUS.length, 16);
  const classes = new Set<unknown>();
  for (const code of EVERY_ERROR_STATUS) {
    const error = fromServiceError(serviceError(code, "what the daemon said"));
    const cls = errorClassFor(code);
    assert.ok(error instanceof cls, `${statusName(code)} is not a ${cls.name}`);
    assert.ok(error instanceof RpcError && error instanceof LegatoError);
    assert.equal(error.code, code);
    assert.equal(cls.code, code);
    assert.equal(error.details, "what the daemon said");
    assert.equal(error.message, `what the daemon said (${statusName(code)})`);
    // The class is named after the code: NOT_FOUND → NotFoundError.
    const camel = statusName(code)
      .toLowerCase()
      .replace(/(^|_)(\w)/g, (_, __, letter: string) => letter.toUpperCase());
    assert.equal(cls.name, `${camel}Error`);
    classes.add(cls);
  }
  assert.equal(classes.size, EVERY_ERROR_STATUS.length);
  assert.equal(errorClassFor(99 as Status), UnknownError);
});

test("an unknown task id is NOT_FOUND", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  await assert.rejects(coder.getTask("t_no_such_task"), (error: unknown) => {
    assert.ok(error instanceof NotFoundError);
    assert.equal(error.code, Status.NOT_FOUND);
    return true;
  });
  await assert.rejects(coder.getHandle("t_no_such_task").result({ timeoutMs: 2_000 }), NotFoundError);
});

test("claiming a label the agent does not hold is PERMISSION_DENIED", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  await legato.agent("researcher");
  await assert.rejects(coder.claim({ labels: ["@researcher"] }), (error: unknown) => {
    assert.ok(error instanceof PermissionDeniedError);
    assert.match(error.message, /@researcher/);
    return true;
  });
});

test("a bad key is UNAUTHENTICATED when connecting", async (t) => {
  const legato = await startLegato(t);
  await assert.rejects(
    Client.connect({ address: legato.daemon.address, apiKey: "lgt_not_a_real_key" }),
    UnauthenticatedError,
  );
  const { apiKey } = await legato.admin.createAgent("revoked", { labels: ["@revoked"] });
  await legato.admin.revokeAgent("revoked");
  await assert.rejects(Client.connect({ address: legato.daemon.address, apiKey }), UnauthenticatedError);
});

test("no daemon on the socket is UNAVAILABLE, and the message says how to start one", async () => {
  const dir = mkdtempSync(join(tmpdir(), "lgts-"));
  try {
    await assert.rejects(
      Client.connect({ address: `unix:${join(dir, "legato.sock")}`, apiKey: "lgt_x", connectTimeoutMs: 2_000 }),
      (error: unknown) => {
        assert.ok(error instanceof UnavailableError);
        assert.match(error.message, /cannot reach the legato daemon at unix:.*legato serve/);
        return true;
      },
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a client without a key refuses to start, saying where a key comes from", () => {
  const saved = process.env.LEGATO_AGENT_KEY;
  delete process.env.LEGATO_AGENT_KEY;
  try {
    assert.throws(() => new Client({ address: "unix:/nonexistent.sock" }), (error: unknown) => {
      assert.ok(error instanceof ConfigurationError && error instanceof LegatoError);
      assert.match(error.message, /LEGATO_AGENT_KEY/);
      return true;
    });
    assert.throws(() => new Client({ address: "unix:/x.sock", apiKey: "lgt_ pasted badly" }), ConfigurationError);
  } finally {
    if (saved !== undefined) process.env.LEGATO_AGENT_KEY = saved;
  }
});
