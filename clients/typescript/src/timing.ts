/**
 * Waiting rules the client applies everywhere: deadlines of waits, the watch
 * resume policy, and sleeps that an AbortSignal ends.
 *
 * @module
 */

import { Status } from "./errors.js";
import { RpcError, TimeoutError } from "./errors.js";
import type { Duration } from "./gen/google/protobuf/duration.js";

/** A watch resumes by itself after these; anything else is the caller's to see. */
export const RESUMABLE: ReadonlySet<Status> = new Set([Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED]);
/** First and longest pause before a dropped watch stream reconnects (doubling in between). */
export const RESUME_FIRST_DELAY_MS = 50;
export const RESUME_MAX_DELAY_MS = 2_000;

/** An optional point in time after which waiting stops. */
export class Deadline {
  private readonly at: number | null;

  /** @param timeoutMs - how long from now; `null`/`undefined` for no limit */
  constructor(timeoutMs?: number | null) {
    this.at = timeoutMs == null ? null : performance.now() + timeoutMs;
  }

  /** Whether there is a limit at all. */
  get bounded(): boolean {
    return this.at !== null;
  }

  /** Milliseconds left (`null`: no limit); throws {@link TimeoutError} once passed. */
  remaining(): number | null {
    if (this.at === null) {
      return null;
    }
    const left = this.at - performance.now();
    if (left <= 0) {
      throw new TimeoutError("timed out waiting for the task");
    }
    return left;
  }
}

/**
 * A call a worker makes again after these (the daemon restarts, or is slow to
 * answer), as long as its lease lasts; anything else is an answer.
 */
export const TRANSIENT: ReadonlySet<Status> = new Set([Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED]);

/** Delays between tries of a call: doubling from 50 ms up to 2 s. */
export class Backoff {
  protected delay = RESUME_FIRST_DELAY_MS;

  /** Back to the shortest delay. */
  reset(): void {
    this.delay = RESUME_FIRST_DELAY_MS;
  }

  /** The delay before the next try; the one after it is longer. */
  next(): number {
    const delay = this.delay;
    this.delay = Math.min(this.delay * 2, RESUME_MAX_DELAY_MS);
    return delay;
  }
}

/** When a dropped watch stream reconnects: resumable codes only, with backoff. */
export class Resume extends Backoff {
  /** An event arrived: the next drop starts the backoff afresh. */
  progressed(): void {
    this.reset();
  }

  /** Milliseconds to wait before reconnecting; throws what cannot be resumed. */
  delayAfter(error: RpcError, deadline: Deadline): number {
    if (error.code === Status.DEADLINE_EXCEEDED && deadline.bounded) {
      throw new TimeoutError("timed out waiting for the task", { cause: error });
    }
    if (!RESUMABLE.has(error.code)) {
      throw error;
    }
    const delay = this.next();
    const left = deadline.remaining();
    return left === null ? delay : Math.min(delay, left);
  }
}

/** Resolves after `ms`, or rejects with the signal's reason as soon as it aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** Seconds as a `google.protobuf.Duration`. */
export function duration(seconds: number | undefined): Duration | undefined {
  if (seconds === undefined) {
    return undefined;
  }
  const micros = Math.round(seconds * 1_000_000);
  const whole = Math.floor(micros / 1_000_000);
  return { seconds: whole, nanos: (micros - whole * 1_000_000) * 1_000 };
}
