/**
 * The client's errors: one tree, with gRPC status codes mapped in one place
 * ({@link fromServiceError}).
 *
 * ```text
 * LegatoError
 * ├── RpcError                      a call failed; `.code` is the gRPC status code
 * │   ├── CancelledError            CANCELLED
 * │   ├── UnknownError              UNKNOWN
 * │   ├── InvalidArgumentError      INVALID_ARGUMENT
 * │   ├── DeadlineExceededError     DEADLINE_EXCEEDED
 * │   ├── NotFoundError             NOT_FOUND
 * │   ├── AlreadyExistsError        ALREADY_EXISTS
 * │   ├── PermissionDeniedError     PERMISSION_DENIED
 * │   ├── ResourceExhaustedError    RESOURCE_EXHAUSTED
 * │   ├── FailedPreconditionError   FAILED_PRECONDITION
 * │   ├── AbortedError              ABORTED
 * │   ├── OutOfRangeError           OUT_OF_RANGE
 * │   ├── UnimplementedError        UNIMPLEMENTED
 * │   ├── InternalError             INTERNAL
 * │   ├── UnavailableError          UNAVAILABLE (e.g. the daemon is not running)
 * │   ├── DataLossError             DATA_LOSS
 * │   └── UnauthenticatedError      UNAUTHENTICATED
 * ├── TaskOutcomeError              a task ended without a result; `.task` is it
 * │   ├── TaskFailedError           FAILED
 * │   └── TaskCanceledError         CANCELED
 * ├── JobInterruptedError           a worker must stop work on a job it claimed
 * │                                 (canceled, deadline passed, lease lost); `.reason`
 * ├── WorkerStoppedError            why a job's signal aborts when its worker stops
 * ├── TimeoutError                  a wait (`timeoutMs`) ran out
 * └── ConfigurationError            no API key, or a socket directory owned by another user
 * ```
 *
 * @module
 */

import { status as Status, type ServiceError } from "@grpc/grpc-js";

import type { Task } from "./models.js";

/** Root of every error the legato client throws. */
export class LegatoError extends Error {
  constructor(message?: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The gRPC status codes (`@grpc/grpc-js`'s `status`); `Status.OK` is never an error. */
export { Status };

/** The name of a status code, e.g. `"NOT_FOUND"`. */
export function statusName(code: number): string {
  return Status[code] ?? `STATUS_${code}`;
}

/** A call to the daemon failed with a gRPC status. */
export class RpcError extends LegatoError {
  /** The gRPC status code. */
  readonly code: Status;
  /** What the daemon (or gRPC) said, without the code. */
  readonly details: string;

  /**
   * @param details - what went wrong, as the daemon said it
   * @param code - the status; defaults to the subclass's own
   */
  constructor(details: string, code?: Status, options?: ErrorOptions) {
    const resolved = code ?? (new.target as RpcErrorClass).code ?? Status.UNKNOWN;
    super(`${details} (${statusName(resolved)})`, options);
    this.code = resolved;
    this.details = details;
  }

  /** The status code this class stands for. */
  static readonly code: Status = Status.UNKNOWN;
}

/** A subclass of {@link RpcError} for one status code. */
export type RpcErrorClass = (new (details: string, code?: Status, options?: ErrorOptions) => RpcError) & {
  readonly code: Status;
};

/** CANCELLED: the call was cancelled, usually by the caller. */
export class CancelledError extends RpcError {
  static override readonly code = Status.CANCELLED;
}
/** UNKNOWN */
export class UnknownError extends RpcError {
  static override readonly code = Status.UNKNOWN;
}
/** INVALID_ARGUMENT: the request broke a limit or a rule; the message names the field. */
export class InvalidArgumentError extends RpcError {
  static override readonly code = Status.INVALID_ARGUMENT;
}
/** DEADLINE_EXCEEDED: the call took longer than its timeout. */
export class DeadlineExceededError extends RpcError {
  static override readonly code = Status.DEADLINE_EXCEEDED;
}
/** NOT_FOUND: no such task or agent, or not in this agent's view. */
export class NotFoundError extends RpcError {
  static override readonly code = Status.NOT_FOUND;
}
/** ALREADY_EXISTS: e.g. an idempotency key reused for a different request. */
export class AlreadyExistsError extends RpcError {
  static override readonly code = Status.ALREADY_EXISTS;
}
/** PERMISSION_DENIED: visible, but this agent may not do that (the message says why). */
export class PermissionDeniedError extends RpcError {
  static override readonly code = Status.PERMISSION_DENIED;
}
/** RESOURCE_EXHAUSTED: a quota (open tasks, output size) or a watcher fell too far behind. */
export class ResourceExhaustedError extends RpcError {
  static override readonly code = Status.RESOURCE_EXHAUSTED;
}
/** FAILED_PRECONDITION: the task is not in a state that allows it (e.g. an old lease token). */
export class FailedPreconditionError extends RpcError {
  static override readonly code = Status.FAILED_PRECONDITION;
}
/** ABORTED */
export class AbortedError extends RpcError {
  static override readonly code = Status.ABORTED;
}
/** OUT_OF_RANGE */
export class OutOfRangeError extends RpcError {
  static override readonly code = Status.OUT_OF_RANGE;
}
/** UNIMPLEMENTED: the daemon does not know the call (an older daemon?). */
export class UnimplementedError extends RpcError {
  static override readonly code = Status.UNIMPLEMENTED;
}
/** INTERNAL: a fault in the daemon; its log says more. */
export class InternalError extends RpcError {
  static override readonly code = Status.INTERNAL;
}
/** UNAVAILABLE: the daemon is not running, not reachable, or shutting down. */
export class UnavailableError extends RpcError {
  static override readonly code = Status.UNAVAILABLE;
}
/** DATA_LOSS */
export class DataLossError extends RpcError {
  static override readonly code = Status.DATA_LOSS;
}
/** UNAUTHENTICATED: a missing, unknown, rotated or revoked API key. */
export class UnauthenticatedError extends RpcError {
  static override readonly code = Status.UNAUTHENTICATED;
}

const BY_CODE: ReadonlyMap<Status, RpcErrorClass> = new Map(
  [
    CancelledError, UnknownError, InvalidArgumentError, DeadlineExceededError,
    NotFoundError, AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError,
    FailedPreconditionError, AbortedError, OutOfRangeError, UnimplementedError,
    InternalError, UnavailableError, DataLossError, UnauthenticatedError,
  ].map((cls): [Status, RpcErrorClass] => [cls.code, cls]),
);

/** The {@link RpcError} class for a status code ({@link UnknownError} for one it does not know). */
export function errorClassFor(code: Status): RpcErrorClass {
  return BY_CODE.get(code) ?? UnknownError;
}

/**
 * The {@link RpcError} subclass for a failed gRPC call: the one place where
 * status codes become error classes.
 *
 * @param error - what `@grpc/grpc-js` reported
 * @param address - the daemon's address, named in the message when it cannot be reached
 */
export function fromServiceError(error: ServiceError, address = ""): RpcError {
  const code: Status = error.code ?? Status.UNKNOWN;
  let details = error.details || statusName(code);
  if (code === Status.UNAVAILABLE && address) {
    details =
      `cannot reach the legato daemon at ${address}: ${details}. ` +
      "Start it with `legato serve` (or `make run`), or point LEGATO_ADDRESS at it";
  }
  return new (errorClassFor(code))(details, code, { cause: error });
}

/** Whether `value` is an error `@grpc/grpc-js` reports for a failed call. */
export function isServiceError(value: unknown): value is ServiceError {
  return (
    value instanceof Error &&
    typeof (value as Partial<ServiceError>).code === "number" &&
    "details" in value &&
    "metadata" in value
  );
}

/** A task finished without a result; {@link TaskOutcomeError.task} is it. */
export class TaskOutcomeError extends LegatoError {
  /** The task as it ended. */
  readonly task: Task;

  constructor(task: Task, options?: ErrorOptions) {
    super(`task ${task.id} ${task.status}: ${task.error || "no reason given"}`, options);
    this.task = task;
  }
}

/** The task ended FAILED; `task.error` says why. */
export class TaskFailedError extends TaskOutcomeError {
}

/** The task was canceled; `task.error` holds the reason. */
export class TaskCanceledError extends TaskOutcomeError {
}

/** A wait given `timeoutMs` ran out before the task got there. */
export class TimeoutError extends LegatoError {
}

/** The client cannot be set up as asked: no API key, or an unsafe socket directory. */
export class ConfigurationError extends LegatoError {
}
