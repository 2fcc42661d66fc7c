/**
 * Where the daemon listens by default: the same rule as the daemon's own
 * (`legato.common.paths`), so that a client run by the same user finds it with
 * no configuration.
 *
 * @module
 */

import { accessSync, constants, statSync } from "node:fs";
import { homedir } from "node:os";
import { join, resolve } from "node:path";

import { ConfigurationError } from "./errors.js";

const APP = "legato";
const SOCKET_NAME = "legato.sock";

/** The environment and process facts the rule reads; the real ones by default. */
export interface AddressEnvironment {
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly platform: NodeJS.Platform;
  readonly uid: number;
}

function currentEnvironment(): AddressEnvironment {
  return { env: process.env, platform: process.platform, uid: process.getuid?.() ?? -1 };
}

function isWritableDir(path: string): boolean {
  try {
    if (!statSync(path).isDirectory()) {
      return false;
    }
    accessSync(path, constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/** Python's `tempfile.gettempdir()`: the first writable of TMPDIR, TEMP, TMP, /tmp, /var/tmp, /usr/tmp, the cwd. */
function tempDir(env: AddressEnvironment["env"]): string {
  const candidates = [env.TMPDIR, env.TEMP, env.TMP, "/tmp", "/var/tmp", "/usr/tmp"];
  for (const candidate of candidates) {
    if (candidate && isWritableDir(candidate)) {
      return resolve(candidate);
    }
  }
  return process.cwd();
}

/**
 * The per-user directory of the daemon's socket.
 *
 * On Linux `$XDG_RUNTIME_DIR/legato` when that is set and a writable directory
 * (e.g. /run/user/UID), else `legato-UID` in the temp dir (`$TMPDIR`, else
 * /tmp); on macOS `~/Library/Caches/TemporaryItems/legato`.
 */
export function defaultRuntimeDir(environment: AddressEnvironment = currentEnvironment()): string {
  const { env, platform, uid } = environment;
  if (platform === "darwin") {
    return join(env.HOME || homedir(), "Library", "Caches", "TemporaryItems", APP);
  }
  const xdg = env.XDG_RUNTIME_DIR ?? "";
  if (xdg && isWritableDir(xdg)) {
    return join(xdg, APP);
  }
  return join(tempDir(env), `${APP}-${uid}`);
}

/**
 * `LEGATO_ADDRESS`, or the unix socket of the default daemon.
 *
 * @throws ConfigurationError if the socket's directory belongs to another
 *   user: in a shared temp dir they could have made it first and be
 *   listening there, and the key must never go to their socket.
 */
export function defaultAddress(environment: AddressEnvironment = currentEnvironment()): string {
  const explicit = environment.env.LEGATO_ADDRESS;
  if (explicit) {
    return explicit;
  }
  const runtime = defaultRuntimeDir(environment);
  checkOwned(runtime, environment.uid);
  return `unix:${join(runtime, SOCKET_NAME)}`;
}

function checkOwned(path: string, uid: number): void {
  let owner: number;
  try {
    owner = statSync(path).uid;
  } catch {
    return; // not there yet: the daemon will create it, owner-only
  }
  if (uid >= 0 && owner !== uid) {
    throw new ConfigurationError(
      `${path} belongs to user id ${owner}, not to you (${uid}); legato will not use it. ` +
        "Remove it, or set LEGATO_ADDRESS / --listen to a socket in your own directory",
    );
  }
}
