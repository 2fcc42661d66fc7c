/**
 * Delegation from TypeScript against a real daemon: the seed flow, events
 * folded from deltas, questions back, the task tree and cancels.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  EventType,
  TaskCanceledError,
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

test("a child task links to its parent and the tree pages through the whole subtree", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;
  await legato.agent("specialist");

  const root = await coder.delegate("@researcher", "audit the payment service");
  const job = await claimOrFail(researcher.claim({ labels: ["@researcher"], leaseSeconds: LONG_LEASE }));
  const child = await researcher.delegate("@specialist", "list the endpoints", { parentId: job.id });
  assert.equal(child.task?.parentId, root.id);
  assert.equal(child.task?.rootId, root.id);
  assert.equal(child.task?.depth, 1);

  const tree = await legato.admin.getTaskTree(root.id);
  assert.deepEqual(
    tree.map((task) => [task.id, task.depth]),
    [
      [root.id, 0],
      [child.id, 1],
    ],
  );
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
  assert.equal(await job.heartbeat(), true); // the worker is told to stop
});

test("result() gives up after timeoutMs with a TimeoutError", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const handle = await coder.delegate("@nobody", "nobody takes this");
  assert.ok(handle.task?.warnings.length, "a label nobody holds is warned about");
  await assert.rejects(handle.result({ timeoutMs: 300 }), TimeoutError);
});

async function claimOrFail(claim: Promise<Job | null>): Promise<Job> {
  const job = await claim;
  assert.ok(job !== null, "nothing to claim");
  return job;
}
