/**
 * `runWorker`: claim by long-poll, run a handler on each job, finish it, take
 * the next; never die of an ordinary ending.
 *
 * @module
 */

import type { Client } from "./client.js";
import { LegatoError, RpcError, Status } from "./errors.js";
import type { Job } from "./job.js";
import type { JsonObject } from "./models.js";
import { Backoff, TRANSIENT, sleep } from "./timing.js";

/**
 * Works on one job. Return the result to complete the task with, or throw to
 * fail it. `signal` (the job's) aborts when the task was canceled meanwhile,
 * the lease was lost, or the worker is stopping: stop work then.
 */
export type JobHandler = (
  job: Job,
  signal: AbortSignal,
) => Promise<JsonObject | void | undefined> | JsonObject | void | undefined;

/** Options of {@link Client.runWorker}. */
export interface WorkerOptions {
  /** Each claim's lease; jobs heartbeat three times per lease. Default 60 s. */
  leaseSeconds?: number;
  /** How long one long-poll claim waits for a task (at most 60 s). Default 30 s. */
  waitSeconds?: number;
  /** How many jobs run at once. Default 1. */
  concurrency?: number;
  /** Stops the worker: the claim in flight is cancelled, running handlers see their signal abort. */
  signal?: AbortSignal;
  /** How long a stopping handler may take before its job is handed back anyway. Default 5 s. */
  stopGraceMs?: number;
  /** Where the worker says what it skipped or retried. Default: `console.warn`. */
  log?: (message: string) => void;
}

/** The reason a running job's signal aborts when its worker stops. */
export class WorkerStoppedError extends LegatoError {}

const DEFAULT_WORK_WAIT_SECONDS = 30;
const DEFAULT_WORK_LEASE_SECONDS = 60;
const DEFAULT_STOP_GRACE_MS = 5_000;

/** See {@link Client.runWorker}. */
export async function runWorker(
  client: Client,
  labels: readonly string[],
  handler: JobHandler,
  options: WorkerOptions = {},
): Promise<void> {
  const log = options.log ?? ((message: string) => console.warn(`legato worker: ${message}`));
  const stop = new AbortController();
  const external = options.signal;
  if (external?.aborted) {
    return;
  }
  const onExternalStop = (): void => stop.abort(new WorkerStoppedError("the worker is stopping"));
  external?.addEventListener("abort", onExternalStop, { once: true });
  const leaseSeconds = options.leaseSeconds ?? DEFAULT_WORK_LEASE_SECONDS;
  const waitSeconds = options.waitSeconds ?? DEFAULT_WORK_WAIT_SECONDS;
  const stopGraceMs = options.stopGraceMs ?? DEFAULT_STOP_GRACE_MS;

  const loop = async (): Promise<void> => {
    const backoff = new Backoff();
    let failures = 0;
    while (!stop.signal.aborted) {
      let job: Job | null;
      try {
        job = await client.claim({ labels, leaseSeconds, waitSeconds, signal: stop.signal });
      } catch (error) {
        if (stop.signal.aborted) {
          return;
        }
        if (!(error instanceof RpcError) || !TRANSIENT.has(error.code)) {
          // A closed client, or a refusal no retry fixes: PERMISSION_DENIED for
          // a label this agent does not hold, UNAUTHENTICATED for a revoked key.
          throw error;
        }
        failures += 1;
        const delay = backoff.next();
        if (failures === 1) {
          log(`claiming failed with ${error.message}; trying again`); // e.g. the daemon restarts
        }
        await sleep(delay, stop.signal).catch(() => {});
        continue;
      }
      if (failures > 0) {
        log(`claims go through again after ${failures} failed`);
        failures = 0;
      }
      backoff.reset();
      if (job !== null) {
        await work(job, handler, stop.signal, stopGraceMs, log);
      }
    }
  };

  const loops = Array.from({ length: Math.max(1, options.concurrency ?? 1) }, async () => {
    try {
      await loop();
    } catch (error) {
      stop.abort(new WorkerStoppedError("another of the worker's loops failed", { cause: error }));
      throw error;
    }
  });
  try {
    const results = await Promise.allSettled(loops);
    const failed = results.find((result): result is PromiseRejectedResult => result.status === "rejected");
    if (failed !== undefined) {
      throw failed.reason;
    }
  } finally {
    external?.removeEventListener("abort", onExternalStop);
  }
}

/**
 * Runs the handler on one job and finishes the job with its outcome. Throws
 * only what ends the worker (the agent's key no longer works).
 */
async function work(
  job: Job,
  handler: JobHandler,
  stop: AbortSignal,
  stopGraceMs: number,
  log: (message: string) => void,
): Promise<void> {
  const grace = graceAfterStop(stop, stopGraceMs);
  const onStop = (): void => job.abortWork(stop.reason);
  stop.addEventListener("abort", onStop, { once: true });
  try {
    if (stop.aborted) {
      return; // claimed as the worker was stopped: straight back (below)
    }
    const settled = await Promise.race([
      Promise.resolve()
        .then(() => handler(job, job.signal))
        .then(
          (result) => ({ ok: true as const, result }),
          (error: unknown) => ({ ok: false as const, error }),
        ),
      grace.expired,
    ]);
    if (settled === "stopped" || job.finished) {
      return; // stopped with the handler still running, or the handler finished the job itself
    }
    if (job.interrupted) {
      log(`${job.interruption}; taking the next task`);
    } else if (settled.ok) {
      await settle(job, { result: settled.result ?? {} }, log);
    } else if (!stop.aborted) {
      await settle(job, { error: describe(settled.error) }, log);
    }
  } finally {
    grace.cancel();
    stop.removeEventListener("abort", onStop);
    if (!job.finished && !job.interrupted) {
      // The worker stops before the job is done: it goes back, without using up an attempt.
      try {
        await job.release("the worker stopped before finishing the task");
      } catch (error) {
        log(`could not hand task ${job.id} back (${describe(error)}); its lease will run out`);
      }
    }
    job.stopHeartbeats();
  }
}

/**
 * Completes the task with `result` (or, with `error`, fails it), unless it
 * ended meanwhile. A daemon that cannot be reached is tried again while the
 * lease lasts; a result that is refused fails the task, saying why; other
 * refusals are logged, except one that ends the worker altogether.
 */
async function settle(
  job: Job,
  outcome: { result: JsonObject | void; error?: undefined } | { error: string; result?: undefined },
  log: (message: string) => void,
): Promise<void> {
  const backoff = new Backoff();
  let error = outcome.error;
  let retrying = false;
  while (!job.finished && !job.interrupted) {
    try {
      if (error === undefined) {
        await job.complete(outcome.result ?? {});
      } else {
        await job.fail(error);
      }
      return;
    } catch (failure) {
      if (failure instanceof TypeError && error === undefined) {
        error = `the handler's result was refused: ${failure.message}`; // not JSON
        continue;
      }
      if (!(failure instanceof RpcError)) {
        log(`could not finish task ${job.id}: ${describe(failure)}`);
        return;
      }
      const left = job.leaseRemainingMs() ?? 0;
      if (TRANSIENT.has(failure.code) && left > 0) {
        if (!retrying) {
          log(`could not finish task ${job.id} yet (${failure.message}); trying again while the lease lasts`);
          retrying = true;
        }
        await sleep(Math.min(backoff.next(), left)); // while the daemon comes back
      } else if (failure.code === Status.INVALID_ARGUMENT && error === undefined) {
        error = `the daemon refused the handler's result: ${failure.details}`;
      } else if (failure.code === Status.UNAUTHENTICATED) {
        throw failure;
      } else {
        log(`could not ${error === undefined ? "complete" : "fail"} task ${job.id}: ${failure.message}`);
        return;
      }
    }
  }
}

/** Resolves "stopped" `graceMs` after `stop` aborts; `cancel` forgets it. */
function graceAfterStop(stop: AbortSignal, graceMs: number): { expired: Promise<"stopped">; cancel: () => void } {
  let timer: NodeJS.Timeout | undefined;
  let onStop = (): void => {};
  const expired = new Promise<"stopped">((resolve) => {
    onStop = (): void => {
      timer = setTimeout(() => resolve("stopped"), graceMs).unref();
    };
  });
  if (stop.aborted) {
    onStop();
  } else {
    stop.addEventListener("abort", onStop, { once: true });
  }
  return {
    expired,
    cancel: () => {
      stop.removeEventListener("abort", onStop);
      clearTimeout(timer);
    },
  };
}

function describe(error: unknown): string {
  if (error instanceof Error) {
    return `${error.name}: ${error.message}`;
  }
  return String(error);
}
