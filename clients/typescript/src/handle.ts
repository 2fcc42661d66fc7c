/**
 * `TaskHandle`: a task this client can wait on, follow, answer or cancel.
 *
 * @module
 */

import type { Client } from "./client.js";
import { TaskCanceledError, TaskFailedError } from "./errors.js";
import { isTerminal, TaskStatus, type OutputChunk, type Task, type TaskEvent } from "./models.js";

/** How long to wait, and a signal that stops waiting. */
export interface WaitOptions {
  /** Give up with a {@link TimeoutError} after this many milliseconds. Default: no limit. */
  timeoutMs?: number;
  /** Stops waiting; the promise or iterator then rejects with the signal's reason. */
  signal?: AbortSignal;
}

/** The task if it is DONE; throws {@link TaskFailedError} or {@link TaskCanceledError} otherwise. */
export function outcome(task: Task, options?: ErrorOptions): Task {
  if (task.status === TaskStatus.FAILED) {
    throw new TaskFailedError(task, options);
  }
  if (task.status === TaskStatus.CANCELED) {
    throw new TaskCanceledError(task, options);
  }
  return task;
}

/** A task this client created or can see: wait for its result, follow its output, answer, cancel. */
export class TaskHandle {
  /** The task's id. */
  readonly id: string;
  /** The task as last seen (from the create, or the events folded so far). */
  task: Task | undefined;
  private readonly client: Client;

  /** Use {@link Client.createTask}, {@link Client.delegate} or {@link Client.getHandle}. */
  constructor(client: Client, taskId: string, task?: Task) {
    this.client = client;
    this.id = taskId;
    this.task = task;
  }

  /** The task as it is now. */
  async get(): Promise<Task> {
    this.task = await this.client.getTask(this.id);
    return this.task;
  }

  /**
   * Waits on a watch stream (from the task's first event, never by polling)
   * for the task to finish, and returns it.
   *
   * @throws TaskFailedError or TaskCanceledError if it did not finish DONE
   * @throws TimeoutError after `timeoutMs`
   */
  async result(options: WaitOptions = {}): Promise<Task> {
    for await (const event of this.events(options)) {
      if (isTerminal(event.task.status)) {
        return outcome(event.task);
      }
    }
    throw new Error("the watch stream ended without an error"); // it resumes instead
  }

  /**
   * Every event of the task from its creation, then live ones, until it
   * finishes. Each event's task is whole: the deltas are folded onto the
   * CREATED task ({@link TaskEvent.onto}).
   */
  async *events(options: WaitOptions = {}): AsyncGenerator<TaskEvent, void, undefined> {
    let task: Task | undefined;
    for await (const delta of this.client.watch({ taskIds: [this.id], afterSeq: 0, ...options })) {
      const event = delta.onto(task);
      task = event.task;
      this.task = task;
      yield event;
      if (isTerminal(task.status)) {
        return;
      }
    }
  }

  /**
   * The task's output as it is written, chunk by chunk, until it finishes.
   *
   * It starts with the current attempt's output so far; what abandoned
   * attempts (lease expired, handed back) wrote is not repeated. When a new
   * attempt begins meanwhile, its output follows.
   */
  async *output(options: WaitOptions = {}): AsyncGenerator<string, void, undefined> {
    for await (const chunk of this.outputChunks(options)) {
      yield chunk.text;
    }
  }

  /** Like {@link TaskHandle.output}, with each chunk's attempt and offset. */
  async *outputChunks(options: WaitOptions = {}): AsyncGenerator<OutputChunk, void, undefined> {
    // The cursor first, then the task: a chunk committed in between is both in
    // the task's output and after the cursor, and is skipped below.
    const cursor = await this.client.getCursor({ signal: options.signal });
    const start = await this.get();
    // Chunks are skipped by the size of the text received, not by
    // `outputSize`: the daemon reads a task's output after its row, so a chunk
    // committed in between can be in `output` but not yet in `outputSize`.
    const startSize = Buffer.byteLength(start.output, "utf8");
    if (start.output) {
      yield { offset: 0, text: start.output, attempt: start.attempt };
    }
    if (isTerminal(start.status)) {
      return;
    }
    for await (const event of this.client.watch({ taskIds: [this.id], afterSeq: cursor, ...options })) {
      const chunk = event.output;
      if (
        chunk !== null &&
        (chunk.attempt > start.attempt || (chunk.attempt === start.attempt && chunk.offset >= startSize))
      ) {
        yield chunk;
      }
      if (isTerminal(event.task.status)) {
        return;
      }
    }
  }

  /** Answers the question the claimant asked (`task.question`). */
  async answer(text: string): Promise<Task> {
    this.task = await this.client.provideInput(this.id, text);
    return this.task;
  }

  /** Cancels the task and, unless `keepChildren`, its unfinished descendants. */
  async cancel(options: { reason?: string; keepChildren?: boolean } = {}): Promise<Task> {
    this.task = await this.client.cancelTask(this.id, options);
    return this.task;
  }

  /** The task and the descendants this agent sees, each after its parent. */
  tree(): Promise<Task[]> {
    return this.client.getTaskTree(this.id);
  }
}
