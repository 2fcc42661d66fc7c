/**
 * `Job`: a task this worker holds a lease on, heartbeating in the background.
 *
 * @module
 */

import type { Client } from "./client.js";
import { FailedPreconditionError, LegatoError, RpcError, Status, TaskFailedError } from "./errors.js";
import { outcome, type WaitOptions } from "./handle.js";
import { EventType, isTerminal, type JsonObject, type Task } from "./models.js";

/** Workers heartbeat this many times per lease. */
export const HEARTBEATS_PER_LEASE = 3;

/** A heartbeat that failed with one of these is tried again at the next beat. */
const TRANSIENT: ReadonlySet<Status> = new Set([
  Status.UNAVAILABLE,
  Status.DEADLINE_EXCEEDED,
  Status.RESOURCE_EXHAUSTED,
  Status.CANCELLED,
]);

/** Why a job's signal aborted when its claim ended without the worker ending it. */
export class ClaimEndedError extends LegatoError {
  /** The task as the daemon last reported it, when known. */
  readonly task: Task | undefined;

  constructor(message: string, task?: Task, options?: ErrorOptions) {
    super(message, options);
    this.task = task;
  }
}

/**
 * A claimed task. Finish it with {@link Job.complete}, {@link Job.fail} or
 * {@link Job.release}; meanwhile {@link Job.write} streams output and
 * {@link Job.ask} asks the creator a question.
 *
 * {@link Job.signal} aborts when the work should stop: the task was canceled or
 * failed at its deadline, the lease was lost, or the worker is stopping.
 */
export class Job {
  /** The task as last reported. */
  task: Task;
  /** Proves the claim; fresh for every claim. */
  readonly leaseToken: string;
  /** Set once the job was completed, failed or released by this worker. */
  finished = false;
  /** Set when a heartbeat learned that the task ended under this claim (canceled, deadline). */
  cancelRequested = false;
  private readonly client: Client;
  private readonly controller = new AbortController();
  private heartbeatTimer: NodeJS.Timeout | undefined;

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

  /** Aborts when the work should stop; its reason says why. */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** Extends the lease; `true` means the task ended meanwhile and work should stop. */
  async heartbeat(options: { leaseSeconds?: number; timeoutMs?: number } = {}): Promise<boolean> {
    const { task, cancelRequested } = await this.client.heartbeat(
      this.id,
      this.leaseToken,
      { leaseSeconds: options.leaseSeconds },
      { timeoutMs: options.timeoutMs },
    );
    this.task = task;
    if (cancelRequested) {
      this.cancelRequested = true;
      this.stopHeartbeats();
      this.abort(endedUnder(task));
    }
    return cancelRequested;
  }

  /** Streams a chunk of the answer to whoever follows the task; returns the output's size (UTF-8 bytes). */
  write(text: string): Promise<number> {
    return this.client.appendOutput(this.id, this.leaseToken, text);
  }

  /**
   * Asks the creator `question` and waits (on a watch stream) for the answer;
   * the lease pauses meanwhile.
   *
   * @throws TaskCanceledError or TaskFailedError if the task ends instead
   */
  async ask(question: string, options: WaitOptions = {}): Promise<string> {
    const asked = await this.client.requestInput(this.id, this.leaseToken, question);
    this.task = asked;
    for await (const event of this.client.watch({ taskIds: [this.id], afterSeq: 0, ...options })) {
      if (event.task.version <= asked.version) {
        continue;
      }
      if (event.type === EventType.INPUT_PROVIDED) {
        this.task = event.onto(this.task).task;
        return event.task.answer;
      }
      if (isTerminal(event.task.status)) {
        outcome(event.task);
        throw new TaskFailedError(event.task); // DONE without an answer: the asker was not this claim
      }
    }
    throw new Error("the watch stream ended without an error"); // it resumes instead
  }

  /** Finishes the task with `result` (a JSON object). */
  async complete(result?: JsonObject): Promise<Task> {
    this.task = await this.client.completeTask(this.id, this.leaseToken, result);
    this.ended();
    return this.task;
  }

  /** Fails the task; with `retryable`, it goes back to PENDING while attempts remain. */
  async fail(error: string, options: { retryable?: boolean } = {}): Promise<Task> {
    this.task = await this.client.failTask(this.id, this.leaseToken, error, options);
    this.ended();
    return this.task;
  }

  /**
   * Hands the task back for another worker (ReleaseTask): PENDING again, and
   * the attempt does not count against `maxAttempts`.
   */
  async release(reason = ""): Promise<Task> {
    this.task = await this.client.releaseTask(this.id, this.leaseToken, reason);
    this.ended();
    return this.task;
  }

  /** Starts the background heartbeats: three per lease, until the job ends. */
  startHeartbeats(leaseSeconds: number): void {
    const every = (leaseSeconds * 1000) / HEARTBEATS_PER_LEASE;
    const beat = async (): Promise<void> => {
      this.heartbeatTimer = undefined;
      if (this.finished || this.client.closed) {
        return;
      }
      try {
        if (await this.heartbeat({ timeoutMs: every })) {
          return;
        }
      } catch (error) {
        if (!(error instanceof RpcError) || !TRANSIENT.has(error.code)) {
          // The claim is gone (expired and taken by another worker, or the task
          // was deleted from this agent's view): nothing to heartbeat any more.
          if (!this.finished) {
            this.abort(new ClaimEndedError(`the claim on task ${this.id} ended: ${String(error)}`, undefined, { cause: error }));
          }
          return;
        }
        // The daemon restarts, or is slow: the lease may still hold at the next beat.
      }
      schedule();
    };
    const schedule = (): void => {
      if (!this.finished && !this.client.closed) {
        // The heartbeat's period, not a synchronisation. Unref'd: a forgotten
        // job must not keep the process alive.
        this.heartbeatTimer = setTimeout(() => void beat(), every).unref();
      }
    };
    schedule();
  }

  /** Stops the background heartbeats. */
  stopHeartbeats(): void {
    if (this.heartbeatTimer !== undefined) {
      clearTimeout(this.heartbeatTimer);
      this.heartbeatTimer = undefined;
    }
  }

  /** Aborts {@link Job.signal} with `reason` (e.g. the worker stops). */
  abort(reason: unknown): void {
    this.controller.abort(reason);
  }

  private ended(): void {
    this.finished = true;
    this.stopHeartbeats();
  }
}

function endedUnder(task: Task): Error {
  try {
    outcome(task);
  } catch (error) {
    return error as Error;
  }
  return new FailedPreconditionError(`task ${task.id} is ${task.status}`);
}
