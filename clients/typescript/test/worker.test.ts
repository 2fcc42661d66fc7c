/**
 * runWorker: a canceled task does not end the worker, a throwing handler fails
 * its task only, and stopping hands unfinished work back.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { EventType, JobInterruptedError, TaskStatus, type Job } from "@legato/client";

import { GUARD_MS, signalled, startLegato, withGuard } from "./support/legato.js";

/** Resolves when `signal` aborts, with its reason. */
function aborted(signal: AbortSignal): Promise<unknown> {
  if (signal.aborted) return Promise.resolve(signal.reason);
  return new Promise((resolve) => signal.addEventListener("abort", () => resolve(signal.reason), { once: true }));
}

test("runWorker survives a task canceled under it and completes the next", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;
  const logged: string[] = [];
  const sawCancel = signalled<unknown>();
  const stop = new AbortController();

  const worker = researcher.runWorker(
    ["@researcher"],
    async (job: Job, signal: AbortSignal) => {
      if (job.task.content === "a long audit") {
        await job.write("started the audit");
        sawCancel.resolve(await aborted(signal)); // the handler stops when told
        throw signal.reason;
      }
      return { answer: `done: ${job.task.content}` };
    },
    { signal: stop.signal, leaseSeconds: 1.5, waitSeconds: 5, log: (message) => logged.push(message) },
  );

  const long = await coder.delegate("@researcher", "a long audit");
  for await (const event of long.events({ timeoutMs: GUARD_MS })) {
    if (event.type === EventType.OUTPUT) break; // the handler is at work
  }
  await long.cancel({ reason: "not needed any more" });
  const reason = await withGuard(sawCancel.promise, "the handler's signal did not abort");
  assert.ok(reason instanceof JobInterruptedError);
  assert.equal(reason.task.status, TaskStatus.CANCELED);
  assert.match(reason.reason, /was canceled: not needed any more/);

  const next = await coder.delegate("@researcher", "the next question");
  assert.deepEqual((await next.result({ timeoutMs: GUARD_MS })).result, { answer: "done: the next question" });

  stop.abort();
  await withGuard(worker, "the worker did not stop");
  assert.equal((await coder.getTask(long.id)).status, TaskStatus.CANCELED);
  assert.ok(
    logged.some((line) => line.includes(long.id) && line.includes("taking the next")),
    logged.join("\n"),
  );
});

test("a handler that throws fails its task and the worker takes the next", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;
  const stop = new AbortController();

  const worker = researcher.runWorker(
    ["@researcher"],
    (job) => {
      if (job.task.content === "divide by zero") {
        throw new RangeError("cannot divide by zero");
      }
      return { ok: true };
    },
    { signal: stop.signal, waitSeconds: 5, log: () => {} },
  );

  const broken = await coder.delegate("@researcher", "divide by zero", { maxAttempts: 1 });
  await assert.rejects(broken.result({ timeoutMs: GUARD_MS }), /RangeError: cannot divide by zero/);
  const fine = await coder.delegate("@researcher", "add two numbers");
  assert.deepEqual((await fine.result({ timeoutMs: GUARD_MS })).result, { ok: true });

  stop.abort();
  await withGuard(worker, "the worker did not stop");
});

test("stopping the worker releases the job it holds, without using up an attempt", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;
  const stop = new AbortController();
  const holding = signalled();

  const worker = researcher.runWorker(
    ["@researcher"],
    async (_job, signal) => {
      holding.resolve();
      await aborted(signal);
      throw signal.reason;
    },
    { signal: stop.signal, waitSeconds: 5, log: () => {} },
  );
  const handle = await coder.delegate("@researcher", "hold this until the worker stops");
  await withGuard(holding.promise, "the handler did not start");

  stop.abort();
  await withGuard(worker, "the worker did not stop");

  const task = await coder.getTask(handle.id);
  assert.equal(task.status, TaskStatus.PENDING);
  assert.deepEqual([task.attempt, task.released], [2, 1]);
  const history = await coder.taskHistory(handle.id);
  assert.deepEqual(
    history.map((event) => event.type),
    [EventType.CREATED, EventType.CLAIMED, EventType.RELEASED],
  );
});

test("a worker for a label it does not hold stops with PERMISSION_DENIED instead of retrying", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  await legato.agent("researcher");
  await assert.rejects(
    coder.runWorker(["@researcher"], () => ({}), { waitSeconds: 1 }),
    (error: unknown) => error instanceof Error && error.name === "PermissionDeniedError",
  );
});

test("heartbeats keep a job's lease while a claim without them runs out", async (t) => {
  const legato = await startLegato(t);
  const coder = (await legato.agent("coder")).client;
  const researcher = (await legato.agent("researcher")).client;
  const kept = await coder.delegate("@researcher", "kept alive by heartbeats");
  const lapsed = await coder.delegate("@researcher", "left to lapse");

  const heartbeating = await researcher.claim({ taskId: kept.id, leaseSeconds: 0.6 });
  await researcher.claim({ taskId: lapsed.id, leaseSeconds: 0.6, heartbeats: false });
  // The daemon's own REQUEUED of the other claim proves its lease's time has passed.
  for await (const event of lapsed.events({ timeoutMs: GUARD_MS })) {
    if (event.type === EventType.REQUEUED) {
      assert.equal(event.actor, "legato");
      break;
    }
  }

  assert.ok(heartbeating !== null);
  const done = await heartbeating.complete({ kept: true });
  assert.deepEqual([done.status, done.attempt], [TaskStatus.DONE, 1]);
});

test("a worker keeps its job while the daemon restarts, and its result lands once it is back", async (t) => {
  const legato = await startLegato(t);
  const coder = await legato.agent("coder");
  const researcher = (await legato.agent("researcher")).client;
  const holding = signalled();
  const finishWhileDown = signalled();
  const retrying = signalled();
  const stop = new AbortController();
  const logged: string[] = [];

  const worker = researcher.runWorker(
    ["@researcher"],
    async () => {
      holding.resolve();
      await finishWhileDown.promise;
      return { survived: true };
    },
    {
      signal: stop.signal,
      // Long enough to outlast the restart on a loaded machine; heartbeats
      // that fail meanwhile are tried again.
      leaseSeconds: 8,
      waitSeconds: 5,
      log: (message) => {
        logged.push(message);
        if (message.includes("trying again")) retrying.resolve();
      },
    },
  );
  const handle = await coder.client.delegate("@researcher", "outlive a restart");
  await withGuard(holding.promise, "the handler did not start");

  await legato.daemon.restart(async () => {
    finishWhileDown.resolve(); // the handler returns while nothing listens
    await withGuard(retrying.promise, "the worker did not try to finish while the daemon was down", GUARD_MS, () =>
      logged.join("\n"),
    );
  });

  const coderAgain = await legato.connect(coder.apiKey);
  const task = await coderAgain.getHandle(handle.id).result({ timeoutMs: GUARD_MS });
  assert.deepEqual(task.result, { survived: true });
  assert.equal(task.attempt, 1); // the lease held: no requeue
  stop.abort();
  await withGuard(worker, "the worker did not stop");
});
