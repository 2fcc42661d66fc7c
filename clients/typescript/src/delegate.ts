/**
 * `delegateToAgent`: one call for an IDE's agent to hand a request to another
 * agent, stream its answer, and get its result.
 *
 * @module
 */

import type { Client } from "./client.js";
import { FailedPreconditionError } from "./errors.js";
import type { TaskHandle } from "./handle.js";
import { outcome } from "./handle.js";
import { EventType, isTerminal, type JsonObject, type OutputChunk } from "./models.js";

/** Options of {@link delegateToAgent}. */
export interface DelegateToAgentOptions {
  /** The task this request is part of: the child is linked to it and canceled with it. */
  parentId?: string;
  /** Gets the delegate's output as it is written. A new attempt (`chunk.attempt`) starts its output afresh. */
  onChunk?: (text: string, chunk: OutputChunk) => void;
  /** Answers a question the delegate asks back; without it the question waits for someone else to answer. */
  onQuestion?: (question: string) => string | Promise<string>;
  /** Called once the task exists, e.g. to show or store its id. */
  onCreated?: (handle: TaskHandle) => void;
  /** Aborting it cancels the task (and its unfinished descendants). */
  signal?: AbortSignal;
  /** Structured input for the delegate. */
  context?: JsonObject;
  /** Makes the create safe to retry. */
  idempotencyKey?: string;
  /** Fail the task if it has not finished by then. */
  deadline?: Date;
  /** Give up waiting (the task goes on) after this long. */
  timeoutMs?: number;
}

/**
 * Delegates `requestText` to the agent `agentName` (its label `@agentName`),
 * streams the delegate's output to `onChunk` as it is written, and resolves
 * with the delegate's result.
 *
 * With `parentId` the task is the parent's child: canceling the parent
 * cancels it too. Aborting `signal` cancels the task; the promise then rejects
 * with a `TaskCanceledError` whose `cause` is the signal's reason (or,
 * if the signal was aborted before the call, with the signal's reason, and no
 * task is created).
 *
 * @param agentName - `"researcher"` or `"@researcher"`
 * @throws TaskFailedError or TaskCanceledError if the task did not finish DONE
 *
 * ```ts
 * const result = await delegateToAgent(client, "researcher", "Tier 1 RPM?", {
 *   onChunk: (text) => stream.markdown(text),
 *   signal: token.signal,
 * });
 * ```
 */
export async function delegateToAgent(
  client: Client,
  agentName: string,
  requestText: string,
  options: DelegateToAgentOptions = {},
): Promise<JsonObject> {
  const { signal } = options;
  signal?.throwIfAborted();
  const label = agentName.startsWith("@") ? agentName : `@${agentName}`;
  const handle = await client.delegate(label, requestText, {
    context: options.context,
    parentId: options.parentId,
    idempotencyKey: options.idempotencyKey,
    deadline: options.deadline,
  });
  options.onCreated?.(handle);

  // The watch ends with the task: an abort cancels the task, and the CANCELED
  // event that follows ends the wait, as any other ending would.
  const stopWatching = new AbortController();
  let cancelFailure: unknown;
  const onAbort = (): void => {
    handle.cancel({ reason: abortReason(signal?.reason) }).catch((error: unknown) => {
      if (!(error instanceof FailedPreconditionError)) {
        cancelFailure = error; // could not cancel: say so instead of waiting on
        stopWatching.abort(error);
      } // else it had finished already: its ending arrives on the watch
    });
  };
  if (signal?.aborted) {
    onAbort();
  } else {
    signal?.addEventListener("abort", onAbort, { once: true });
  }
  try {
    for await (const event of handle.events({ timeoutMs: options.timeoutMs, signal: stopWatching.signal })) {
      if (event.output !== null) {
        options.onChunk?.(event.output.text, event.output);
      }
      if (event.type === EventType.INPUT_REQUESTED && options.onQuestion) {
        await handle.answer(await options.onQuestion(event.task.question));
      }
      if (isTerminal(event.task.status)) {
        const aborted = signal?.aborted && event.task.status !== "done";
        outcome(event.task, aborted ? { cause: signal?.reason } : undefined);
        return event.task.result ?? {};
      }
    }
  } catch (error) {
    if (cancelFailure !== undefined) {
      throw cancelFailure;
    }
    throw error;
  } finally {
    signal?.removeEventListener("abort", onAbort);
  }
  throw new Error("the watch stream ended without an error"); // it resumes instead
}

function abortReason(reason: unknown): string {
  if (reason instanceof Error && reason.name !== "AbortError") {
    return `aborted by the delegating agent: ${reason.message}`;
  }
  return "aborted by the delegating agent";
}
