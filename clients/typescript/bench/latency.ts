/**
 * Two figures of the TypeScript client against a real daemon it starts:
 *
 * - cold start: a new `node` process, from its spawn to `Client.connect()`
 *   resolved (Node's start, the module load, the channel, the WhoAmI probe),
 *   median of 10; also from Node's own time origin, and when the module had loaded;
 * - create → result: `delegate()` then `handle.result()` (a watch from seq 0)
 *   with a TypeScript `runWorker` on the other side in this process, median
 *   and p99 over 200 round trips after 20 to warm up.
 *
 * Run: `npm run bench` in clients/typescript (after `make install` at the
 * repository root). Prints one JSON line.
 */

import { spawn } from "node:child_process";
import { once } from "node:events";
import { performance } from "node:perf_hooks";

import { Client } from "@legato/client";

import { Daemon, PACKAGE_ROOT } from "../test/support/legato.js";

const COLD_STARTS = 10;
const WARMUP = 20;
const ROUND_TRIPS = 200;

function quantile(sorted: number[], q: number): number {
  const index = Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1);
  return sorted[Math.max(0, index)]!;
}

const round = (ms: number): number => Math.round(ms * 100) / 100;

/**
 * A fresh `node` process connecting: milliseconds from its spawn to its
 * "connected" line (what a user waits for), and from its own time origin
 * (Node's bootstrap done) to connected.
 */
async function coldStart(
  address: string,
  apiKey: string,
): Promise<{ spawned: number; inProcess: number; loaded: number }> {
  const script = `
    const { Client } = await import("@legato/client");
    const loaded = performance.now();
    const client = await Client.connect({ address: process.env.ADDRESS, apiKey: process.env.KEY });
    console.log(performance.now(), loaded);
    client.close();`;
  const started = performance.now();
  const child = spawn(process.execPath, ["--input-type=module", "-e", script], {
    cwd: PACKAGE_ROOT,
    env: { ...process.env, ADDRESS: address, KEY: apiKey },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const [line] = (await once(child.stdout, "data")) as [Buffer];
  const spawned = performance.now() - started;
  await once(child, "exit");
  const [connected, loaded] = line.toString().trim().split(" ").map(Number);
  return { spawned, inProcess: connected ?? NaN, loaded: loaded ?? NaN };
}

const daemon = await Daemon.start();
try {
  const admin = await Client.connect({ address: daemon.address, apiKey: daemon.adminKey });
  const coderKey = (await admin.createAgent("coder", { labels: ["@coder"] })).apiKey;
  const researcherKey = (await admin.createAgent("researcher", { labels: ["@researcher"] })).apiKey;

  const cold: Array<{ spawned: number; inProcess: number; loaded: number }> = [];
  for (let n = 0; n < COLD_STARTS; n++) {
    cold.push(await coldStart(daemon.address, coderKey));
  }
  const spawnedMs = cold.map((run) => run.spawned).sort((a, b) => a - b);
  const inProcessMs = cold.map((run) => run.inProcess).sort((a, b) => a - b);
  const loadedMs = cold.map((run) => run.loaded).sort((a, b) => a - b);

  const coder = await Client.connect({ address: daemon.address, apiKey: coderKey });
  const researcher = await Client.connect({ address: daemon.address, apiKey: researcherKey });
  const stop = new AbortController();
  const worker = researcher.runWorker(["@researcher"], (job) => ({ echo: job.task.content }), {
    signal: stop.signal,
    waitSeconds: 30,
  });
  const latencies: number[] = [];
  for (let n = 0; n < WARMUP + ROUND_TRIPS; n++) {
    const started = performance.now();
    const handle = await coder.delegate("@researcher", `question ${n}`);
    await handle.result({ timeoutMs: 10_000 });
    if (n >= WARMUP) latencies.push(performance.now() - started);
  }
  stop.abort();
  await worker;
  latencies.sort((a, b) => a - b);
  console.log(
    JSON.stringify({
      node: process.version,
      connect_cold_start_ms: {
        from_spawn_median: round(quantile(spawnedMs, 0.5)),
        from_node_time_origin_median: round(quantile(inProcessMs, 0.5)),
        of_which_module_loaded_median: round(quantile(loadedMs, 0.5)),
        runs: COLD_STARTS,
      },
      create_to_result_ms: {
        median: round(quantile(latencies, 0.5)),
        p99: round(quantile(latencies, 0.99)),
        max: round(latencies.at(-1) ?? 0),
        round_trips: ROUND_TRIPS,
      },
    }),
  );
  for (const client of [admin, coder, researcher]) client.close();
} finally {
  await daemon.destroy();
}
