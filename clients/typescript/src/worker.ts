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
import { Resume, Deadline, sleep, RESUMABLE } from "./timing.js";

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
  /** How long a stopping handler may take before its job is released anyway. Default 5 s. */
  stopGraceMs?: number;
  /** Where the worker says what it skipped or retried. Default: `console.warn`. */
  log?: (message: string) => void;
}

/** The reason a running job's signal aborts when its worker stops. */
export class WorkerStoppedError extends LegatoError {}

const DEFAULT_WORK_WAIT_SECONDS = 30;
const DEFAULT_WORK_LEASE_SECONDS = 60;
const DEFAULT_STOP_GRACE_MS = 5_000;
/** Tries of a finishing call while the daemon is unreachable: about 5 s with the watch backoff. */
const FINISH_ATTEMPTS = 8;
/** What a finishing call answers when the claim ended meanwhile (canceled, expired, taken over). */
const CLAIM_GONE: ReadonlySet<Status> = new Set([Status.FAILED_PRECONDITION, Status.NOT_FOUND, Status.PERMISSION_DENIED]);
/** Besides RESUMABLE: a claim that ran out of time is just tried again. */
const RETRY_CLAIM: ReadonlySet<Status> = new Set([...RESUMABLE, Status.DEADLINE_EXCEEDED]);

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
  const onExternalStop = (): void => stop.abort(new WorkerStoppedError("the worker is stopping"));
  if (external?.aborted) {
    return;
  }
  external?.addEventListener("abort", onExternalStop, { once: true });
  const settings = {
    labels,
    leaseSeconds: options.leaseSeconds ?? DEFAULT_WORK_LEASE_SECONDS,
    waitSeconds: options.waitSeconds ?? DEFAULT_WORK_WAIT_SECONDS,
    stopGraceMs: options.stopGraceMs ?? DEFAULT_STOP_GRACE_MS,
  };
  const loop = async (): Promise<void> => {
    const resume = new Resume();
    while (!stop.signal.aborted) {
      let job: Job | null;
      try {
        job = await client.claim({
          labels: settings.labels,
          leaseSeconds: settings.leaseSeconds,
          waitSeconds: settings.waitSeconds,
          signal: stop.signal,
        });
      } catch (error) {
        if (stop.signal.aborted) {
          return;
        }
        if (!(error instanceof RpcError) || !RETRY_CLAIM.has(error.code)) {
          throw error; // e.g. PERMISSION_DENIED for a label this agent does not hold
        }
        log(`claim failed, trying again: ${error.message}`); // e.g. the daemon restarts
        const retryable = new RpcError(error.details, Status.UNAVAILABLE);
        await sleep(resume.delayAfter(retryable, new Deadline()), stop.signal).catch(() => {});
        continue;
      }
      resume.progressed();
      if (job !== null) {
        await work(job, handler, stop.signal, settings.stopGraceMs, log);
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

/** Runs the handler on one job and finishes the job, whatever happens; never throws. */
async function work(
  job: Job,
  handler: JobHandler,
  stop: AbortSignal,
  stopGraceMs: number,
  log: (message: string) => void,
): Promise<void> {
  const grace = graceAfterStop(stop, stopGraceMs);
  const onStop = (): void => job.abort(stop.reason);
  stop.addEventListener("abort", onStop, { once: true });
  // The task ended under the claim (canceled, deadline) or the claim was lost.
  const endedMeanwhile = (): boolean =>
    job.cancelRequested || (job.signal.aborted && !(job.signal.reason instanceof WorkerStoppedError));
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
    if (endedMeanwhile()) {
      log(`task ${job.id} ended meanwhile (${describe(job.signal.reason)}); taking the next`);
    } else if (settled.ok) {
      await finish(job, () => completeOrFail(job, settled.result), log);
    } else if (!stop.aborted) {
      await finish(job, () => job.fail(describe(settled.error)), log);
    }
  } finally {
    grace.cancel();
    stop.removeEventListener("abort", onStop);
    if (!job.finished && !endedMeanwhile()) {
      // The worker stops before the job is done: it goes back, without using up an attempt.
      await finish(job, () => job.release("the worker stopped before finishing the task"), log);
    }
    job.stopHeartbeats();
  }
}

/** Completes with `result`; a result the daemon (or JSON) refuses fails the task, saying why. */
async function completeOrFail(job: Job, result: JsonObject | void | undefined): Promise<void> {
  try {
    await job.complete(result ?? {});
  } catch (error) {
    if (error instanceof RpcError && CLAIM_GONE.has(error.code)) {
      throw error;
    }
    await job.fail(`the handler's result was refused: ${describe(error)}`);
  }
}

/**
 * Runs a step that finishes the job. While the daemon is unreachable (it
 * restarts) the step is tried again for a few seconds: the lease and its token
 * survive a restart. When it cannot finish (the claim ended meanwhile), logs why.
 */
async function finish(job: Job, step: () => Promise<unknown>, log: (message: string) => void): Promise<void> {
  const resume = new Resume();
  for (let attempt = 1; ; attempt++) {
    try {
      await step();
      return;
    } catch (error) {
      if (error instanceof RpcError && error.code === Status.UNAVAILABLE && attempt < FINISH_ATTEMPTS) {
        log(`could not finish task ${job.id} yet, trying again: ${error.message}`);
        await sleep(resume.delayAfter(error, new Deadline()));
        continue;
      }
      job.stopHeartbeats();
      job.finished = true;
      log(`could not finish task ${job.id}: ${describe(error)}`);
      return;
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
