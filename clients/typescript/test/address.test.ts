/**
 * The default address: the same rule as the daemon's (legato.common.paths),
 * checked against the Python implementation itself.
 */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chownSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { ConfigurationError, defaultAddress } from "@legato/client";

import { PYTHON } from "./support/legato.js";

const uid = process.getuid?.() ?? -1;

function pythonDefaultAddress(env: Record<string, string>): string {
  return execFileSync(PYTHON, ["-c", "from legato.common.paths import default_address; print(default_address())"], {
    env: { PATH: process.env.PATH ?? "", ...env },
    encoding: "utf8",
  }).trim();
}

function environment(env: Record<string, string>) {
  return { env, platform: "linux" as const, uid };
}

test("the default address is the one the daemon listens on, for every kind of environment", (t) => {
  const root = mkdtempSync(join(tmpdir(), "lgts-"));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  const runtime = join(root, "run");
  const temp = join(root, "tmp");
  mkdirSync(runtime);
  mkdirSync(temp);
  writeFileSync(join(root, "a-file"), "");

  const cases: Record<string, Record<string, string>> = {
    "LEGATO_ADDRESS wins": { LEGATO_ADDRESS: "unix:/somewhere/else.sock", XDG_RUNTIME_DIR: runtime },
    "XDG_RUNTIME_DIR when set": { XDG_RUNTIME_DIR: runtime, TMPDIR: temp },
    "TMPDIR without XDG_RUNTIME_DIR": { TMPDIR: temp },
    "TMPDIR when XDG_RUNTIME_DIR is not a directory": { XDG_RUNTIME_DIR: join(root, "a-file"), TMPDIR: temp },
    "TMPDIR when XDG_RUNTIME_DIR does not exist": { XDG_RUNTIME_DIR: join(root, "gone"), TMPDIR: temp },
    "/tmp when TMPDIR does not exist": { TMPDIR: join(root, "gone") },
  };
  for (const [name, env] of Object.entries(cases)) {
    assert.equal(defaultAddress(environment(env)), pythonDefaultAddress(env), name);
  }
  assert.equal(defaultAddress(environment({ XDG_RUNTIME_DIR: runtime })), `unix:${runtime}/legato/legato.sock`);
  assert.equal(defaultAddress(environment({ TMPDIR: temp })), `unix:${temp}/legato-${uid}/legato.sock`);
});

test("a socket directory owned by another user is refused", { skip: uid !== 0 && "needs root to chown" }, (t) => {
  const root = mkdtempSync(join(tmpdir(), "lgts-"));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  mkdirSync(join(root, "legato"));
  chownSync(join(root, "legato"), 65534, 65534);
  assert.throws(
    () => defaultAddress(environment({ XDG_RUNTIME_DIR: root })),
    (error: unknown) => {
      assert.ok(error instanceof ConfigurationError);
      assert.match(error.message, /belongs to user id 65534/);
      return true;
    },
  );
});
