/**
 * The legato TypeScript client: delegate tasks to other agents and pick up
 * their results, or work on the tasks routed to you.
 *
 * ```ts
 * import { Client } from "@legato/client";
 *
 * const coder = await Client.connect(); // LEGATO_ADDRESS, LEGATO_AGENT_KEY
 * const handle = await coder.delegate("@researcher", "current RPM for Tier 1?");
 * const task = await handle.result({ timeoutMs: 60_000 });
 * ```
 *
 * @packageDocumentation
 */

export { defaultAddress, defaultRuntimeDir } from "./address.js";
export {
  Client,
  DEFAULT_LEASE_SECONDS,
  type AgentWithKey,
  type CallSettings,
  type ClaimOptions,
  type ClientOptions,
  type ConnectOptions,
  type CreateTaskOptions,
  type DelegateOptions,
  type ListTasksOptions,
  type WatchOptions,
} from "./client.js";
export { delegateToAgent, type DelegateToAgentOptions } from "./delegate.js";
export {
  AbortedError,
  AlreadyExistsError,
  CancelledError,
  ConfigurationError,
  DataLossError,
  DeadlineExceededError,
  FailedPreconditionError,
  InternalError,
  InvalidArgumentError,
  LegatoError,
  NotFoundError,
  OutOfRangeError,
  PermissionDeniedError,
  ResourceExhaustedError,
  RpcError,
  Status,
  TaskCanceledError,
  TaskFailedError,
  TaskOutcomeError,
  TimeoutError,
  UnauthenticatedError,
  UnavailableError,
  UnimplementedError,
  UnknownError,
  errorClassFor,
  fromServiceError,
  statusName,
  type RpcErrorClass,
} from "./errors.js";
export { TaskHandle, type WaitOptions } from "./handle.js";
export { HEARTBEATS_PER_LEASE, Job, JobInterruptedError } from "./job.js";
export {
  EventType,
  Role,
  TaskEvent,
  TaskStatus,
  isTerminal,
  type Agent,
  type JsonObject,
  type JsonValue,
  type OutputChunk,
  type Task,
  type TaskPage,
} from "./models.js";
export { WorkerStoppedError, type JobHandler, type WorkerOptions } from "./worker.js";
