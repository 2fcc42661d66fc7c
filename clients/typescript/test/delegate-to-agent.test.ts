/**
 * delegateToAgent, the IDE's one call: output streamed as it is written, the
 * result at the end, an AbortSignal that cancels, and a child that goes down
 * with its parent.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  JobInterruptedError,
  TaskCanceledError,
  TaskStatus,
  delegateToAgent,
  type Job,
  type TaskHandle,
} from "@legato/client";

import { signalled, startLegato, withGuard } from "./support/legato.js";

test("delegateToAgent streams the delegate's chunks in order as they are written, then resolves with the result", async (t) => {
  const legato = await startLegato(t);
  const theia = (await legato.agent("theia")).client;
  const researcher = (await legato.agent("researcher")).client;
  const chunks = ["Reading RFC 9113... ", "HTTP/2 frames ", "carry a 24-bit length."];

  // Each chunk is written only once the previous one has reached onChunk: the
  // output arrives while the delegate works, not after it finished.
  const arrived = chunks.map(() => signalled());
  const received: string[] = [];
  const delegation = delegateToAgent(theia, "researcher", "Summarise RFC 9113 frame sizes", {
    context: { file: "src/http2.ts", line: 42 },
    onChunk: (text) => {
      received.push(text);
      arrived[received.length - 1]?.resolve();
    },
  });

  const job = await claimOrFail(researcher.claim({ labels: ["@researcher"], waitSeconds: 5 }));
  assert.deepEqual(job.task.context, { file: "src/http2.ts", line: 42 });
  for (const [n, chunk] of chunks.entries()) {
    await job.write(chunk);
    await withGuard(arrived[n]!.promise, `chunk ${n} did not reach onChunk`);
  }
  await job.complete({ max_frame_size: 16_384, source: "RFC 9113 §4.2" });

  assert.deepEqual(await delegation, { max_frame_size: 16_384, source: "RFC 9113 §4.2" });
  assert.deepEqual(received, chunks);
});

test("a question the delegate asks back is answered by onQuestion", async (t) => {
  const legato = await startLegato(t);
  const theia = (await legato.agent("theia")).client;
  const researcher = (await legato.agent("researcher")).client;
  const asked: string[] = [];

  const delegation = delegateToAgent(theia, "researcher", "What is our rate limit?", {
    onQuestion: (question) => {
      asked.push(question);
      return "Tier 1";
    },
  });
  const job = await claimOrFail(researcher.claim({ labels: ["@researcher"], waitSeconds: 5 }));
  const tier = await job.ask("Tier 1 or Tier 2?", { timeoutMs: 10_000 });
  await job.complete({ tier, rpm: 500 });

  assert.deepEqual(await delegation, { tier: "Tier 1", rpm: 500 });
  assert.deepEqual(asked, ["Tier 1 or Tier 2?"]);
});

test("aborting the signal cancels the delegated task and rejects with a cancel error", async (t) => {
  const legato = await startLegato(t);
  const theia = (await legato.agent("theia")).client;
  const researcher = (await legato.agent("researcher")).client;
  const controller = new AbortController();
  const created = signalled<TaskHandle>();

  const delegation = delegateToAgent(theia, "@researcher", "Find every caller of parseFrame", {
    signal: controller.signal,
    onCreated: created.resolve,
    onChunk: () => controller.abort(new Error("the user pressed stop")),
  });
  const job = await claimOrFail(researcher.claim({ labels: ["@researcher"], waitSeconds: 5 }));
  const workerStopped = interrupted(job);
  const rejected = assert.rejects(delegation, (error: unknown) => {
    assert.ok(error instanceof TaskCanceledError);
    assert.equal(error.task.status, TaskStatus.CANCELED);
    assert.match(error.task.error, /aborted by the delegating agent: the user pressed stop/);
    assert.equal((error.cause as Error).message, "the user pressed stop");
    return true;
  });
  await job.write("src/http2.ts:10 "); // onChunk aborts when it arrives
  await rejected;
  const handle = await created.promise;
  assert.equal((await theia.getTask(handle.id)).status, TaskStatus.CANCELED);
  await withGuard(workerStopped, "the worker's job signal did not abort");
  // The job watches its task: the worker learns at once, not at its next heartbeat.
  assert.ok(job.cancelRequested && job.signal.reason instanceof JobInterruptedError);
});

test("a signal aborted before the call creates nothing and rejects with its reason", async (t) => {
  const legato = await startLegato(t);
  const theia = (await legato.agent("theia")).client;
  await legato.agent("researcher");
  const reason = new Error("stopped before it started");
  await assert.rejects(
    delegateToAgent(theia, "researcher", "never sent", { signal: AbortSignal.abort(reason) }),
    (error: unknown) => error === reason,
  );
  assert.deepEqual((await theia.listTasks()).tasks, []);
});

test("canceling the parent task cancels the delegated child, and delegateToAgent rejects", async (t) => {
  const legato = await startLegato(t);
  const user = (await legato.agent("user")).client;
  const theia = (await legato.agent("theia")).client;
  const researcher = (await legato.agent("researcher")).client;

  // The user's request is the parent; Theia works on it and delegates a part.
  const parent = await user.delegate("@theia", "refactor the frame parser");
  const theiaJob = await claimOrFail(theia.claim({ labels: ["@theia"], waitSeconds: 5 }));
  const child = signalled<TaskHandle>();
  const delegation = delegateToAgent(theia, "researcher", "Find every caller of parseFrame", {
    parentId: theiaJob.id,
    onCreated: child.resolve,
  });
  const researcherJob = await claimOrFail(researcher.claim({ labels: ["@researcher"], waitSeconds: 5 }));
  const childHandle = await child.promise;
  assert.equal(researcherJob.id, childHandle.id);
  assert.equal(researcherJob.task.parentId, parent.id);

  const rejected = assert.rejects(delegation, (error: unknown) => {
    assert.ok(error instanceof TaskCanceledError);
    assert.equal(error.task.id, childHandle.id);
    assert.match(error.task.error, /canceled with its ancestor task .*the user changed their mind/);
    return true;
  });
  await parent.cancel({ reason: "the user changed their mind" });
  await rejected;
  assert.equal((await researcher.getTask(childHandle.id)).status, TaskStatus.CANCELED);
  await withGuard(interrupted(researcherJob), "the delegate's job was not interrupted");
  assert.ok(researcherJob.cancelRequested);
});

/** Resolves when the job's signal aborts. */
function interrupted(job: Job): Promise<void> {
  if (job.signal.aborted) return Promise.resolve();
  return new Promise((resolve) => job.signal.addEventListener("abort", () => resolve(), { once: true }));
}

async function claimOrFail(claim: Promise<Job | null>): Promise<Job> {
  const job = await withGuard(claim, "the claim did not return");
  assert.ok(job !== null, "nothing to claim");
  return job;
}
