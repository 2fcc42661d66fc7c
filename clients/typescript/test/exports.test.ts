/** The package's public face: exactly these names, so none appears or goes by accident. */

import assert from "node:assert/strict";
import { test } from "node:test";

import * as legato from "@legato/client";

test("the package exports exactly its public API", () => {
  assert.deepEqual(Object.keys(legato).sort(), [
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "Client",
    "ConfigurationError",
    "DEFAULT_LEASE_SECONDS",
    "DataLossError",
    "DeadlineExceededError",
    "EventType",
    "FailedPreconditionError",
    "HEARTBEATS_PER_LEASE",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobInterruptedError",
    "LegatoError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Role",
    "RpcError",
    "Status",
    "TaskCanceledError",
    "TaskEvent",
    "TaskFailedError",
    "TaskHandle",
    "TaskOutcomeError",
    "TaskStatus",
    "TimeoutError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "WorkerStoppedError",
    "defaultAddress",
    "defaultRuntimeDir",
    "delegateToAgent",
    "errorClassFor",
    "fromServiceError",
    "isTerminal",
    "statusName",
  ]);
});
