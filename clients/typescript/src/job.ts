/**
 * `Job`: a task this worker holds a lease on, guarded in the background by
 * heartbeats and a watch of the task.
 *
 * @module
 */

import type { Client } from "./client.js";
import { LegatoError, RpcError, Status, TaskFailedError } from "./errors.js";
import { outcome, type WaitOptions } from "./handle.js";
import { EventType, isTerminal, TaskStatus, type JsonObject, type Task } from "./models.js";
import { Backoff, TRANSIENT } from "./timing.js";

/** Workers heartbeat this many times per lease. */
export const HEARTBEATS_PER_LEASE = 3;

/** The jobs of each client whose background heartbeats run; closing the client interrupts them. */
const guarded = new WeakMap<Client, Set<Job>>();

/** Interrupts the guarded jobs of `client` (it is being closed); their leases run out on the daemon. */
export function interruptJobsOf(client: Client): void {
  for (const job of guarded.get(client) ?? []) {
    job.interrupt("the client was closed");
  }
  guarded.delete(client);
}

/**
 * Work on a claimed task must stop: it was canceled or failed under the claim
 * (e.g. its deadline passed), the lease was lost, or the client was closed.
 *
 * A job's signal aborts with it, and the job's calls (`write`, `ask`,
 * `heartbeat`) throw it once the job is interrupted.
 */
export class JobInterruptedError extends LegatoError {
  /** The task as last seen. */
  readonly task: Task;
  /** Why, in a sentence. */
  readonly reason: string;

  constructor(task: Task, reason: string) {
    super(reason);
    this.task = task;
    this.reason = reason;
  }
}

/**
 * When a job's lease ends, as far as the worker can tell without the daemon:
 * counted from when each heartbeat was sent, so it ends no later than the
 * daemon's own (which counts from when the call arrived).
 */
class LeaseClock {
  private endsAt: number;

  constructor(public leaseSeconds: number) {
    this.endsAt = performance.now() + leaseSeconds * 1000;
  }

  /** A heartbeat sent at `sentAt` (performance.now()) extended the lease. */
  renewed(sentAt: number, leaseSeconds?: number): void {
    if (leaseSeconds !== undefined) {
      this.leaseSeconds = leaseSeconds;
    }
    this.endsAt = sentAt + this.leaseSeconds * 1000;
  }

  /** Milliseconds until the lease ends; 0 or less once it has. */
  remainingMs(): number {
    return this.endsAt - performance.now();
  }

  /** Milliseconds between heartbeats. */
  everyMs(): number {
    return (this.leaseSeconds * 1000) / HEARTBEATS_PER_LEASE;
  }
}

/** A pause that a call to `wake()` cuts short, or `stop` ends. */
class Alarm {
  private ring: (() => void) | undefined;
  private rung = false;

  wake(): void {
    this.rung = true;
    this.ring?.();
  }

  /** Waits `ms`, less if woken (now or earlier, since the last wait). */
  wait(ms: number, stop: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        stop.removeEventListener("abort", done);
        this.ring = undefined;
        this.rung = false;
        resolve();
      };
      // The heartbeat's period, not a synchronisation.
      const timer = setTimeout(done, Math.max(0, ms));
      if (this.rung || stop.aborted) {
        done();
        return;
      }
      this.ring = done;
      stop.addEventListener("abort", done, { once: true });
    });
  }
}

/**
 * A claimed task. Finish it with {@link Job.complete}, {@link Job.fail} or
 * {@link Job.release}; meanwhile {@link Job.write} streams output and
 * {@link Job.ask} asks the creator a question.
 *
 * With background heartbeats (every job from `claim` and `runWorker`), the job
 * watches its task too, so that it learns at once when the task ends under
 * the claim (canceled, failed at its deadline) or the lease is lost; then
 * {@link Job.interruption} says why and {@link Job.signal} aborts with a
 * {@link JobInterruptedError}. Heartbeats are the fallback.
 */
export class Job {
  /** The task as last reported. */
  task: Task;
  /** Proves the claim; fresh for every claim. */
  readonly leaseToken: string;
  /** Set once the job was completed, failed or released by this worker. */
  finished = false;
  /** Set when the task was canceled, or failed (its deadline), under this claim. */
  cancelRequested = false;
  /** Set when the claim ended otherwise: the lease ran out, the task was reclaimed or went out of sight. */
  lost = false;
  /** Why work on the job must stop, once it must. */
  interruption: string | null = null;
  private readonly client: Client;
  private readonly controller = new AbortController();
  // Ends the background heartbeats and watch.
  private readonly guard = new AbortController();
  private readonly alarm = new Alarm();
  private lease: LeaseClock | undefined;
  // While complete/fail/release is on its way, news of an ending is no
  // interruption: it may be this very call's own doing.
  private finishing = false;

  /** Use {@link Client.claim}. */
  constructor(client: Client, task: Task, leaseToken: string) {
    this.client = client;
    this.task = task;
    this.leaseToken = leaseToken;
  }

  /** The task's id. */
  get id(): string {
    return this.task.id;
  }

  /**
   * Aborts when work on the job should stop: with a {@link JobInterruptedError}
   * when the job is interrupted, with a `WorkerStoppedError` when the worker
   * running it stops.
   */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** Whether work on the job must stop; {@link Job.interruption} says why. */
  get interrupted(): boolean {
    return this.interruption !== null;
  }

  /** Milliseconds left of the lease as far as this worker can tell (`null` without background heartbeats). */
  leaseRemainingMs(): number | null {
    return this.lease?.remainingMs() ?? null;
  }

  /**
   * Extends the lease; `true` means the task ended meanwhile and work should stop.
   *
   * @param options.leaseSeconds - replaces the claim's lease length from now on
   */
  async heartbeat(options: { leaseSeconds?: number; timeoutMs?: number } = {}): Promise<boolean> {
    this.checkInterrupted();
    const sentAt = performance.now();
    const { task, cancelRequested } = await this.client.heartbeat(
      this.id,
      this.leaseToken,
      { leaseSeconds: options.leaseSeconds },
      { timeoutMs: options.timeoutMs },
    );
    this.task = task;
    this.lease?.renewed(sentAt, options.leaseSeconds);
    if (cancelRequested) {
      this.interrupt(endedUnder(task), { canceled: true });
    }
    return cancelRequested;
  }

  /** Streams a chunk of the answer to whoever follows the task; returns the output's size (UTF-8 bytes). */
  write(text: string): Promise<number> {
    this.checkInterrupted();
    return this.client.appendOutput(this.id, this.leaseToken, text);
  }

  /**
   * Asks the creator `question` and waits (on a watch stream) for the answer;
   * the lease pauses meanwhile.
   *
   * @throws TaskCanceledError or TaskFailedError if the task ends instead
   */
  async ask(question: string, options: WaitOptions = {}): Promise<string> {
    this.checkInterrupted();
    const asked = await this.client.requestInput(this.id, this.leaseToken, question);
    this.task = asked;
    for await (const event of this.client.watch({ taskIds: [this.id], afterSeq: 0, ...options })) {
      if (event.task.version <= asked.version) {
        continue;
      }
      if (event.type === EventType.INPUT_PROVIDED) {
        this.task = event.onto(this.task).task; // events are deltas
        return event.task.answer;
      }
      if (isTerminal(event.task.status)) {
        outcome(event.task);
        throw new TaskFailedError(event.task); // DONE without an answer: the asker was not this claim
      }
    }
    throw new Error("the watch stream ended without an error"); // it resumes instead
  }

  /** Finishes the task DONE with `result` (a JSON object). */
  complete(result?: JsonObject): Promise<Task> {
    return this.finish(() => this.client.completeTask(this.id, this.leaseToken, result));
  }

  /** Fails the task; with `retryable`, it goes back to PENDING while attempts remain. */
  fail(error: string, options: { retryable?: boolean } = {}): Promise<Task> {
    return this.finish(() => this.client.failTask(this.id, this.leaseToken, error, options));
  }

  /**
   * Hands the task back unfinished (ReleaseTask): PENDING again for another
   * worker, and the attempt does not count against `maxAttempts`.
   */
  release(reason = ""): Promise<Task> {
    return this.finish(() => this.client.releaseTask(this.id, this.leaseToken, reason));
  }

  /**
   * Keeps the claim alive in the background until the job is finished (a
   * heartbeat every third of the lease), and watches the task so that an
   * ending under the claim is known at once. {@link Client.claim} starts it.
   */
  startHeartbeats(leaseSeconds: number): void {
    if (this.lease !== undefined) {
      return;
    }
    this.lease = new LeaseClock(leaseSeconds);
    let jobs = guarded.get(this.client);
    if (jobs === undefined) {
      jobs = new Set();
      guarded.set(this.client, jobs);
    }
    jobs.add(this);
    void this.beat(this.lease);
    void this.follow();
  }

  /** Stops the background heartbeats and watch. */
  stopHeartbeats(): void {
    if (!this.guard.signal.aborted) {
      this.guard.abort();
      guarded.get(this.client)?.delete(this);
    }
  }

  /**
   * Interrupts the job: {@link Job.signal} aborts with a {@link JobInterruptedError}
   * and the job's calls throw it. Nothing is sent to the daemon.
   */
  interrupt(reason: string, flags: { canceled?: boolean; lost?: boolean } = {}): void {
    if (this.finished || this.finishing || this.interruption !== null) {
      return;
    }
    this.interruption = reason;
    this.cancelRequested ||= flags.canceled ?? false;
    this.lost ||= flags.lost ?? false;
    this.stopHeartbeats();
    this.controller.abort(new JobInterruptedError(this.task, reason));
  }

  /** Aborts {@link Job.signal} with `reason` without interrupting the job (its worker stops). */
  abortWork(reason: unknown): void {
    this.controller.abort(reason);
  }

  private checkInterrupted(): void {
    if (this.interruption !== null) {
      throw new JobInterruptedError(this.task, this.interruption);
    }
  }

  private async finish(call: () => Promise<Task>): Promise<Task> {
    this.finishing = true;
    try {
      this.task = await call();
    } catch (error) {
      this.finishing = false;
      throw error;
    }
    this.finished = true;
    this.stopHeartbeats();
    return this.task;
  }

  private async beat(lease: LeaseClock): Promise<void> {
    const stop = this.guard.signal;
    const backoff = new Backoff();
    let failures = 0;
    let wait = lease.everyMs();
    while (!stop.aborted) {
      await this.alarm.wait(wait, stop); // the period, cut short by news from the watch
      if (stop.aborted || this.client.closed) {
        return;
      }
      const left = lease.remainingMs();
      if (left <= 0 && failures > 0) {
        this.interrupt(lostClaim(this.id, "the lease ran out while heartbeats could not reach the daemon"), {
          lost: true,
        });
        return;
      }
      const sentAt = performance.now();
      try {
        // A heartbeat that cannot answer before the lease ends is no use.
        const timeoutMs = Math.max(1, Math.min(this.client.timeoutMs ?? left, left));
        const { task, cancelRequested } = await this.client.heartbeat(this.id, this.leaseToken, {}, { timeoutMs });
        this.task = task;
        if (cancelRequested) {
          this.interrupt(endedUnder(task), { canceled: true });
          return;
        }
      } catch (error) {
        if (stop.aborted || this.client.closed) {
          return;
        }
        if (!(error instanceof RpcError) || !TRANSIENT.has(error.code)) {
          // e.g. FAILED_PRECONDITION: the lease is gone.
          this.interrupt(lostClaim(this.id, String(error instanceof Error ? error.message : error)), { lost: true });
          return;
        }
        failures += 1; // the daemon restarts, or is slow: the lease may still hold
        wait = Math.min(backoff.next(), Math.max(left, 0));
        continue;
      }
      failures = 0;
      backoff.reset();
      lease.renewed(sentAt);
      wait = lease.everyMs();
    }
  }

  private async follow(): Promise<void> {
    const stop = this.guard.signal;
    try {
      // From now on: an ending between the claim and this cursor is not in the
      // watch, so one heartbeat right away tells.
      const afterSeq = await this.client.getCursor({ signal: stop });
      this.alarm.wake();
      for await (const event of this.client.watch({ taskIds: [this.id], afterSeq, signal: stop })) {
        if (event.task.status !== TaskStatus.CLAIMED && event.task.status !== TaskStatus.INPUT_REQUIRED) {
          this.alarm.wake(); // the claim may have ended: a heartbeat tells for sure
        }
      }
    } catch {
      // Stopped, closed, or out of sight: the heartbeats tell the rest.
      this.alarm.wake();
    }
  }
}

/** Why a heartbeat said to stop (`cancelRequested`): the task's ending, in a sentence. */
function endedUnder(task: Task): string {
  const verb = task.status === TaskStatus.CANCELED ? "was canceled" : task.status;
  return `task ${task.id} ${verb}: ${task.error || "no reason given"}`;
}

function lostClaim(taskId: string, why: string): string {
  return `lost the claim on task ${taskId}: ${why}`;
}
