/**
 * Delegation from TypeScript against a real daemon: the seed flow, events
 * folded from deltas, questions back, the task tree and cancels.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  EventType,
  JobInterruptedError,
  TaskCanceledError,
  TaskFailedError,
  TaskStatus,
  TimeoutError,
  type Job,
  type TaskEvent,
} from "@legato/client";

import { GUARD_MS, startLegato } from "./support/legato.js";

const LONG_LEASE = 120;

test("the researcher's result reaches the coder on a watch stream, integers intact", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;

  const handle = await coder.delegate("@researcher", "What is the current rate limit for Tier 1?", {
    context: { urgency: "high", blocking: true, check_date: "2026-12-01" },
  });
  const job = await researcher.claim({ labels: ["@researcher"], leaseSeconds: LONG_LEASE, waitSeconds: 5 });
  assert.ok(job !== null, "nothing to claim on @researcher");
  assert.equal(job.id, handle.id);
  assert.deepEqual(job.task.context, { urgency: "high", blocking: true, check_date: "2026-12-01" });

  await job.write("Checking the pricing page... ");
  await job.write("Tier 1 allows 500 requests per minute.");
  await job.complete({
    rpm: 500,
    tpm: 30_000,
    source: "https://docs.example/limits#tier-1",
    verified_at: "2026-12-01T09:30:00Z",
  });

  const task = await handle.result({ timeoutMs: GUARD_MS });
  assert.equal(task.status, TaskStatus.DONE);
  assert.deepEqual(task.result, {
    rpm: 500,
    tpm: 30_000,
    source: "https://docs.example/limits#tier-1",
    verified_at: "2026-12-01T09:30:00Z",
  });
  assert.ok(Number.isInteger(task.result?.rpm) && Number.isInteger(task.result?.tpm));
  assert.equal(task.outputSize, Buffer.byteLength("Checking the pricing page... Tier 1 allows 500 requests per minute."));
  // The folded task keeps what only CREATED carried.
  assert.equal(task.content, "What is the current rate limit for Tier 1?");
  assert.deepEqual(task.context, { urgency: "high", blocking: true, check_date: "2026-12-01" });
});

test("events replay from the creation and fold the deltas into the whole task", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;
  const context = { repo: "legato", notes: "x".repeat(10_000) };

  const handle = await coder.delegate("@researcher", "summarise the open issues", { context });
  const job = await claimOrFail(researcher.claim({ labels: ["@researcher"], leaseSeconds: LONG_LEASE }));
  await job.write("3 open issues");
  await job.complete({ open: 3 });

  const events: TaskEvent[] = [];
  for await (const event of handle.events({ timeoutMs: GUARD_MS })) {
    events.push(event);
  }
  assert.deepEqual(
    events.map((e) => e.type),
    [EventType.CREATED, EventType.CLAIMED, EventType.OUTPUT, EventType.COMPLETED],
  );
  assert.deepEqual(
    events.map((e) => e.actor),
    ["coder", "researcher", "researcher", "researcher"],
  );
  for (const event of events) {
    assert.deepEqual(event.task.context, context, `${event.type} lost the context`);
    assert.equal(event.task.content, "summarise the open issues");
  }
  assert.deepEqual(events.at(-1)?.task.result, { open: 3 });
  assert.deepEqual(events[2]?.output, { offset: 0, text: "3 open issues", attempt: 1 });

  // A raw watch sends deltas: the OUTPUT event does not carry the context again.
  const raw: TaskEvent[] = [];
  for await (const event of coder.watch({ taskIds: [handle.id], afterSeq: 0 })) {
    raw.push(event);
    if (event.type === EventType.COMPLETED) break;
  }
  assert.deepEqual(raw[2]?.task.context, {});
  assert.deepEqual(raw.map((e) => e.seq), events.map((e) => e.seq));
});

test("output streams chunk by chunk while the worker writes", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;
  const chunks = ["Tier 1 allows ", "50 requests/min ", "(façade docs, 日本語 mirror) ", "📚✅"];

  const handle = await coder.delegate("@researcher", "stream me the answer");
  const job = await claimOrFail(researcher.claim({ labels: ["@researcher"], leaseSeconds: LONG_LEASE }));
  const received: string[] = [];
  const following = (async () => {
    for await (const text of handle.output({ timeoutMs: GUARD_MS })) {
      received.push(text);
    }
  })();
  for (const chunk of chunks) {
    await job.write(chunk);
  }
  await job.complete({ done: true });
  await following;

  assert.equal(received.join(""), chunks.join(""));
  assert.equal((await coder.getTask(handle.id)).output, chunks.join(""));
});

test("the worker asks the coder a question and gets the answer back", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;

  const handle = await coder.delegate("@researcher", "migrate the billing table");
  const job = await claimOrFail(researcher.claim({ labels: ["@researcher"], leaseSeconds: LONG_LEASE }));
  const answer = job.ask("which region first, eu or us?", { timeoutMs: GUARD_MS });

  for await (const event of handle.events({ timeoutMs: GUARD_MS })) {
    if (event.type === EventType.INPUT_REQUESTED) {
      assert.equal(event.task.status, TaskStatus.INPUT_REQUIRED);
      assert.equal(event.task.question, "which region first, eu or us?");
      await handle.answer("eu");
      break;
    }
  }
  assert.equal(await answer, "eu");
  await job.complete({ region: "eu" });
  assert.deepEqual((await handle.result({ timeoutMs: GUARD_MS })).result, { region: "eu" });
});

test("children link to their parent, and the tree comes whole though it spans pages", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;
  await legato.agent("specialist");

  const root = await coder.delegate("@researcher", "audit the payment service");
  const job = await claimOrFail(researcher.claim({ labels: ["@researcher"], leaseSeconds: LONG_LEASE }));
  // Four children of 900 KB each: more than one 3 MiB page of GetTaskTree.
  const children = [];
  for (const part of ["endpoints", "schemas", "retries", "alerts"]) {
    const child = await researcher.delegate("@specialist", `review the ${part}`, {
      parentId: job.id,
      context: { dump: "x".repeat(900_000) },
    });
    assert.deepEqual([child.task?.parentId, child.task?.rootId, child.task?.depth], [root.id, root.id, 1]);
    children.push(child);
  }

  const tree = await legato.admin.getTaskTree(root.id);
  assert.deepEqual(
    tree.map((task) => [task.id, task.depth]),
    [[root.id, 0], ...children.map((child) => [child.id, 1])],
  );
  assert.ok(tree.slice(1).every((task) => task.context.dump === "x".repeat(900_000)));
  assert.deepEqual((await root.tree()).map((task) => task.id), [root.id]); // the coder sees its own task only
});

test("cancelling a task cancels its unfinished children, and result() says so", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;
  await legato.agent("specialist");

  const root = await coder.delegate("@researcher", "plan the release");
  const job = await claimOrFail(researcher.claim({ labels: ["@researcher"], leaseSeconds: LONG_LEASE }));
  const child = await researcher.delegate("@specialist", "write the notes", { parentId: job.id });

  const canceled = await root.cancel({ reason: "superseded by 1.3" });
  assert.equal(canceled.status, TaskStatus.CANCELED);
  await assert.rejects(root.result({ timeoutMs: GUARD_MS }), (error: unknown) => {
    assert.ok(error instanceof TaskCanceledError);
    assert.equal(error.task.error, "superseded by 1.3");
    return true;
  });
  await assert.rejects(child.result({ timeoutMs: GUARD_MS }), TaskCanceledError);
  await interrupted(job); // the worker is told to stop
  assert.ok(job.cancelRequested && job.interrupted);
});

test("result() gives up after timeoutMs with a TimeoutError", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const handle = await coder.delegate("@nobody", "nobody takes this");
  assert.ok(handle.task?.warnings.length, "a label nobody holds is warned about");
  await assert.rejects(handle.result({ timeoutMs: 300 }), TimeoutError);
});

test("a task that misses its deadline fails, and its claimant is told to stop", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;

  const handle = await coder.delegate("@researcher", "answer within the call", {
    deadline: new Date(Date.now() + 300),
  });
  const job = await claimOrFail(researcher.claim({ taskId: handle.id, leaseSeconds: LONG_LEASE }));
  await assert.rejects(handle.result({ timeoutMs: GUARD_MS }), (error: unknown) => {
    assert.ok(error instanceof TaskFailedError);
    assert.match(error.task.error, /deadline/);
    return true;
  });
  await interrupted(job);
  assert.ok(job.cancelRequested && job.signal.reason instanceof JobInterruptedError);
  assert.match(job.interruption ?? "", /failed: .*deadline/);
});

test("the same idempotency key returns the original task instead of a second one", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const first = await coder.delegate("@researcher", "check the changelog", { idempotencyKey: "changelog-1" });
  const retried = await coder.delegate("@researcher", "check the changelog", { idempotencyKey: "changelog-1" });
  assert.equal(retried.id, first.id);
  assert.equal((await coder.listTasks()).tasks.length, 1);
});

/** Resolves when the job's signal aborts. */
function interrupted(job: Job): Promise<void> {
  if (job.signal.aborted) return Promise.resolve();
  return new Promise((resolve) => job.signal.addEventListener("abort", () => resolve(), { once: true }));
}

async function claimOrFail(claim: Promise<Job | null>): Promise<Job> {
  const job = await claim;
  assert.ok(job !== null, "nothing to claim");
  return job;
}
