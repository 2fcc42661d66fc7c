/**
 * A real daemon for each test: the repository's own `legato serve` (from its
 * .venv) on a temp unix socket with a temp database, agents created through
 * the admin key it writes, and every client and process closed afterwards.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import type { TestContext } from "node:test";

import { Client, type Role } from "@legato/client";

/** The longest any single wait in a test may take before it fails instead of hanging. */
export const GUARD_MS = 10_000;
/** The longest a daemon may take to start or stop (a loaded machine imports Python slowly). */
const DAEMON_GUARD_MS = 30_000;

function findUp(start: string, found: (dir: string) => boolean, what: string): string {
  for (let dir = start; ; dir = dirname(dir)) {
    if (found(dir)) {
      return dir;
    }
    if (dirname(dir) === dir) {
      throw new Error(`no ${what} above ${start}`);
    }
  }
}

const here = dirname(fileURLToPath(import.meta.url));
/** clients/typescript: where package.json is. */
export const PACKAGE_ROOT = findUp(here, (dir) => existsSync(join(dir, "package.json")), "package.json");
/** The repository: where the Python project and its .venv are. */
export const REPO_ROOT = findUp(
  PACKAGE_ROOT,
  (dir) => existsSync(join(dir, "pyproject.toml")) && existsSync(join(dir, "proto", "legato")),
  "legato repository",
);
const VENV_BIN = join(REPO_ROOT, ".venv", "bin");
/** The repository's Python, with the legato client installed. */
export const PYTHON = join(VENV_BIN, "python");
const LEGATO = join(VENV_BIN, "legato");

// Daemons still running when this test process ends (a test that timed out and
// was cut off, say) are killed with it instead of being left behind.
const running = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});
process.once("SIGTERM", () => process.exit(143));

/** A `legato serve` process on a temp data dir and socket; restartable on both. */
export class Daemon {
  readonly dir: string;
  readonly address: string;
  private process: ChildProcess | undefined;
  private log: string[] = [];

  private constructor(dir: string) {
    this.dir = dir;
    this.address = `unix:${join(dir, "legato.sock")}`;
  }

  /** Starts a daemon on a new temp dir and waits for its ready line. */
  static async start(): Promise<Daemon> {
    if (!existsSync(LEGATO)) {
      throw new Error(`${LEGATO} is missing: run 'make install' in ${REPO_ROOT} first`);
    }
    // A short path: unix socket paths are limited to ~100 bytes.
    const daemon = new Daemon(mkdtempSync(join(tmpdir(), "lgts-")));
    try {
      await daemon.serve();
    } catch (error) {
      rmSync(daemon.dir, { recursive: true, force: true });
      throw error;
    }
    return daemon;
  }

  /** The admin key the daemon wrote on its first start. */
  get adminKey(): string {
    return readFileSync(join(this.dir, "admin.key"), "utf8").trim();
  }

  /** Everything the daemon wrote so far, for failure messages. */
  get output(): string {
    return this.log.join("\n");
  }

  private async serve(): Promise<void> {
    const child = spawn(LEGATO, ["serve", "--data-dir", this.dir, "--listen", this.address, "--grace", "1"], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.process = child;
    running.add(child);
    child.once("exit", () => running.delete(child));
    createInterface({ input: child.stderr! }).on("line", (line) => this.log.push(line));
    const stdout = createInterface({ input: child.stdout! });
    const ready = new Promise<void>((resolve, reject) => {
      stdout.on("line", (line) => {
        this.log.push(line);
        if (line.startsWith("legato serving on")) {
          resolve();
        }
      });
      child.once("exit", (code) => reject(new Error(`legato serve exited (${code}):\n${this.output}`)));
      child.once("error", reject);
    });
    try {
      await withGuard(ready, "legato serve did not get ready", DAEMON_GUARD_MS, () => this.output);
    } catch (error) {
      child.kill("SIGKILL"); // nothing will stop it otherwise, and it keeps this process alive
      throw error;
    }
  }

  /** Stops the daemon the way an operator does (SIGTERM) and waits for it to exit. */
  async stop(): Promise<void> {
    const child = this.process;
    this.process = undefined;
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) {
      return;
    }
    const exited = once(child, "exit");
    child.kill("SIGTERM");
    try {
      await withGuard(exited, "legato serve did not stop on SIGTERM", DAEMON_GUARD_MS, () => this.output);
    } catch (error) {
      child.kill("SIGKILL");
      throw error;
    }
  }

  /** SIGTERM, then (after `whileDown`, if given) a new daemon on the same data dir and socket. */
  async restart(whileDown?: () => Promise<void>): Promise<void> {
    await this.stop();
    await whileDown?.();
    await this.serve();
  }

  /** Stops the daemon and removes its files. */
  async destroy(): Promise<void> {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** An agent created for a test: its name, labels, key and a connected client. */
export interface TestAgent {
  readonly name: string;
  readonly label: string;
  readonly apiKey: string;
  readonly client: Client;
}

/** A daemon for one test, its admin, and a way to add agents. */
export interface Legato {
  readonly daemon: Daemon;
  readonly admin: Client;
  /** Creates agent `name` (labels default `@name`) and connects a client as it. */
  agent(name: string, options?: { labels?: string[]; role?: Role }): Promise<TestAgent>;
  /** Connects another client (closed after the test). */
  connect(apiKey: string): Promise<Client>;
}

/** Starts a daemon for the test `t`; it and every client are closed when the test ends. */
export async function startLegato(t: TestContext): Promise<Legato> {
  const daemon = await Daemon.start();
  const clients: Client[] = [];
  t.after(async () => {
    for (const client of clients) {
      client.close();
    }
    await daemon.destroy();
  });
  const connect = async (apiKey: string): Promise<Client> => {
    const client = await Client.connect({ address: daemon.address, apiKey, timeoutMs: GUARD_MS });
    clients.push(client);
    return client;
  };
  const admin = await connect(daemon.adminKey);
  return {
    daemon,
    admin,
    connect,
    async agent(name, options = {}) {
      const labels = options.labels ?? [`@${name}`];
      const { apiKey } = await admin.createAgent(name, { labels, role: options.role });
      return { name, label: labels[0] ?? "", apiKey, client: await connect(apiKey) };
    },
  };
}

/** `promise`, or a failure with `message` (and what `details` says then) after `ms`. */
export async function withGuard<T>(
  promise: Promise<T>,
  message: string,
  ms = GUARD_MS,
  details?: () => string,
): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const guard = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const more = details?.();
      reject(new Error(`${message} (after ${ms} ms)${more ? `:\n${more}` : ""}`));
    }, ms);
  });
  try {
    return await Promise.race([promise, guard]);
  } finally {
    clearTimeout(timer);
  }
}

/** A promise with its resolve function outside, for "tell me when X happened". */
export function signalled<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/** A process of the repository's Python, with its stdout as JSON lines. */
export class PythonScript {
  readonly lines: AsyncIterator<string>;
  private readonly child: ChildProcess;
  private stderr = "";
  private readonly exited: Promise<[number | null, NodeJS.Signals | null]>;

  /** Runs test/py/`name` with `env` added to the environment. */
  constructor(name: string, env: Record<string, string>) {
    this.child = spawn(PYTHON, [join(PACKAGE_ROOT, "test", "py", name)], {
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child.stderr!.on("data", (data: Buffer) => {
      this.stderr += data.toString();
    });
    this.exited = once(this.child, "exit") as Promise<[number | null, NodeJS.Signals | null]>;
    this.lines = createInterface({ input: this.child.stdout! })[Symbol.asyncIterator]();
  }

  /** The next line the script printed, parsed as JSON. */
  async next(): Promise<Record<string, unknown>> {
    const line = await withGuard(this.lines.next(), `no output from the Python script:\n${this.stderr}`);
    if (line.done) {
      const [code] = await this.exited;
      throw new Error(`the Python script ended (${code}) before printing more:\n${this.stderr}`);
    }
    return JSON.parse(line.value) as Record<string, unknown>;
  }

  /** Waits for the script to end; fails with its stderr if it did not succeed. */
  async success(): Promise<void> {
    const [code, signal] = await withGuard(this.exited, `the Python script did not end:\n${this.stderr}`);
    if (code !== 0) {
      throw new Error(`the Python script failed (${code ?? signal}):\n${this.stderr}`);
    }
  }

  /** Ends the script if it still runs. */
  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill("SIGTERM");
    }
  }
}
