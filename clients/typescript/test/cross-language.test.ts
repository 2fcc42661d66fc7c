/**
 * The TypeScript and Python clients on one daemon: each side delegates to the
 * other, and contexts, results and output cross intact.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { TaskStatus } from "@legato/client";

import { GUARD_MS, PythonScript, startLegato } from "./support/legato.js";

test("a TypeScript coder delegates to a Python worker and gets its result", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = await legato.agent("researcher");
  const worker = new PythonScript("worker.py", {
    LEGATO_ADDRESS: legato.daemon.address,
    LEGATO_AGENT_KEY: researcher.apiKey,
    LABEL: "@researcher",
  });
  t.after(() => worker.kill());

  const handle = await coder.delegate("@researcher", "What is the current rate limit for Tier 1?", {
    context: { urgency: "high", blocking: true, check_date: "2026-12-01", retries: 3 },
  });
  const claimed = await worker.next();
  assert.equal(claimed.claimed, handle.id);
  assert.deepEqual(claimed.context, { urgency: "high", blocking: true, check_date: "2026-12-01", retries: 3 });
  assert.deepEqual(claimed.types, { urgency: "str", blocking: "bool", check_date: "str", retries: "int" });

  const output: string[] = [];
  for await (const text of handle.output({ timeoutMs: GUARD_MS })) {
    output.push(text);
  }
  const task = await handle.result({ timeoutMs: GUARD_MS });
  await worker.success();

  assert.equal(output.join(""), "Tier 1 allows 500 requests per minute.");
  assert.equal(task.status, TaskStatus.DONE);
  assert.equal(task.claimedBy, "researcher");
  assert.deepEqual(task.result, {
    rpm: 500,
    tpm: 30_000,
    source: "https://docs.example/limits",
    verified_at: "2026-12-01T09:30:00Z",
  });
});

test("a Python coder delegates to a TypeScript worker and gets its result", async (t) => {
  const legato = await startLegato(t);
  const researcher = (await legato.agent("researcher")).client;
  const coder = await legato.agent("coder");
  const script = new PythonScript("coder.py", {
    LEGATO_ADDRESS: legato.daemon.address,
    LEGATO_AGENT_KEY: coder.apiKey,
    LABEL: "@researcher",
  });
  t.after(() => script.kill());

  const created = await script.next();
  const stop = new AbortController();
  const working = researcher.runWorker(
    ["@researcher"],
    async (job) => {
      assert.equal(job.id, created.created);
      assert.deepEqual(job.task.context, { urgency: "high", blocking: true, check_date: "2026-12-01", retries: 3 });
      await job.write("Tier 1 allows ");
      await job.write("500 requests per minute.");
      stop.abort(); // this one job only; the result below still completes it
      return { rpm: 500, tpm: 30_000, source: "https://docs.example/limits", verified_at: "2026-12-01T09:30:00Z" };
    },
    { signal: stop.signal, waitSeconds: 5 },
  );

  const seen = await script.next();
  await script.success();
  await working;
  assert.equal(seen.status, "done");
  assert.equal(seen.output, "Tier 1 allows 500 requests per minute.");
  assert.deepEqual(seen.result, {
    rpm: 500,
    tpm: 30_000,
    source: "https://docs.example/limits",
    verified_at: "2026-12-01T09:30:00Z",
  });
  assert.deepEqual(seen.types, { rpm: "int", tpm: "int", source: "str", verified_at: "str" });
});
