/**
 * Plain TypeScript views of the `legato.v1` messages the client returns, and
 * the conversions to and from the generated ones.
 *
 * @module
 */

import { Role as ProtoRole, type Agent as ProtoAgent } from "./gen/legato/v1/agents.js";
import {
  TaskEventType as ProtoEventType,
  TaskStatus as ProtoStatus,
  type Task as ProtoTask,
  type TaskEvent as ProtoTaskEvent,
} from "./gen/legato/v1/tasks.js";

/** A JSON value, as a task's `context` and `result` hold them. */
export type JsonValue = null | boolean | number | string | JsonValue[] | JsonObject;

/** A JSON object: a task's `context` or `result`. */
export type JsonObject = { [key: string]: JsonValue };

/** Where a task is in its life. DONE, FAILED and CANCELED are terminal. */
export const TaskStatus = {
  PENDING: "pending",
  CLAIMED: "claimed",
  DONE: "done",
  FAILED: "failed",
  CANCELED: "canceled",
  /** The claimant asked the creator a question (`Task.question`). */
  INPUT_REQUIRED: "input_required",
} as const;
/** One of the {@link TaskStatus} values, e.g. `"done"`. */
export type TaskStatus = (typeof TaskStatus)[keyof typeof TaskStatus];

/** Whether a task in `status` is finished for good (DONE, FAILED or CANCELED). */
export function isTerminal(status: TaskStatus): boolean {
  return status === TaskStatus.DONE || status === TaskStatus.FAILED || status === TaskStatus.CANCELED;
}

/** What changed in a {@link TaskEvent}. */
export const EventType = {
  CREATED: "created",
  CLAIMED: "claimed",
  COMPLETED: "completed",
  FAILED: "failed",
  CANCELED: "canceled",
  /** Back to PENDING: the lease ran out, or a retryable failure. */
  REQUEUED: "requeued",
  /** A chunk of output: {@link TaskEvent.output}. */
  OUTPUT: "output",
  INPUT_REQUESTED: "input_requested",
  INPUT_PROVIDED: "input_provided",
  /** The claimant handed the task back (`job.release()`); the attempt is not counted. */
  RELEASED: "released",
} as const;
/** One of the {@link EventType} values, e.g. `"completed"`. */
export type EventType = (typeof EventType)[keyof typeof EventType];

/** What an agent may do: admins manage agents and see every task. */
export const Role = { ADMIN: "admin", AGENT: "agent" } as const;
/** One of the {@link Role} values. */
export type Role = (typeof Role)[keyof typeof Role];

/** A task as the daemon reported it. */
export interface Task {
  readonly id: string;
  /** What is asked, in plain text. */
  readonly content: string;
  /** Routing labels, each `@name`. */
  readonly labels: readonly string[];
  /** Structured input from the creator. */
  readonly context: JsonObject;
  /** The worker's structured answer; set when DONE. */
  readonly result: JsonObject | null;
  readonly status: TaskStatus;
  /** Why the last attempt failed, or why the task was canceled. */
  readonly error: string;
  readonly createdBy: string;
  /** The current or last claimant. */
  readonly claimedBy: string;
  readonly parentId: string;
  /** The top of the parent chain; the task's own id when it has no parent. */
  readonly rootId: string;
  /** 1 for the first attempt; each return to PENDING starts a new one. */
  readonly attempt: number;
  readonly maxAttempts: number;
  /** Grows by one with every recorded change. */
  readonly version: number;
  readonly createdAt: Date;
  readonly updatedAt: Date;
  /** Set while CLAIMED. */
  readonly leaseExpiresAt: Date | null;
  /** 0 for a task without a parent, its parent's depth + 1 otherwise. */
  readonly depth: number;
  /** When set, the task fails if it has not finished by then. */
  readonly deadline: Date | null;
  /** UTF-8 bytes of output the current attempt wrote so far. */
  readonly outputSize: number;
  /** The current attempt's output; only from `getTask` (events carry chunks instead). */
  readonly output: string;
  /** The last question the claimant asked, and the creator's answer to it. */
  readonly question: string;
  readonly answer: string;
  /** Only on a just-created task: e.g. that no agent holds one of its labels yet. */
  readonly warnings: readonly string[];
  /** Attempts handed back with `release()`; they do not count against `maxAttempts`. */
  readonly released: number;
}

/** A piece of an attempt's output; `offset` counts UTF-8 bytes from the start of that attempt's output. */
export interface OutputChunk {
  readonly offset: number;
  readonly text: string;
  /** The attempt that wrote it ({@link Task.attempt}). */
  readonly attempt: number;
}

/** One page of `listTasks`; pass `nextPageToken` for the next (`""` on the last). */
export interface TaskPage {
  readonly tasks: Task[];
  readonly nextPageToken: string;
  /** The event seq of the listing: `watch({ afterSeq: cursor })` continues it without a gap. */
  readonly cursor: number;
}

/** An agent known to the daemon. Its key is never part of it. */
export interface Agent {
  readonly name: string;
  readonly labels: readonly string[];
  readonly role: Role;
  readonly createdAt: Date;
  readonly lastSeenAt: Date | null;
  readonly revoked: boolean;
}

type Blob = "content" | "context" | "result" | "error" | "question" | "answer";
const BLOBS: readonly Blob[] = ["content", "context", "result", "error", "question", "answer"];

/**
 * The texts and blobs each event type carries (the contract, `TaskEvent.task`):
 * any other is left out of the event and keeps the value it had before.
 */
export const CARRIES: Readonly<Record<Exclude<EventType, "created">, readonly Blob[]>> = {
  claimed: ["question", "answer"],
  completed: ["result", "error"],
  failed: ["error"],
  canceled: ["error"],
  requeued: ["error"],
  released: ["error"],
  output: [],
  input_requested: ["question", "answer"],
  input_provided: ["question", "answer"],
};

/** One change of a task; `seq` is the cursor to resume a watch from. */
export class TaskEvent {
  /** Strictly increasing over all events of the daemon. */
  readonly seq: number;
  readonly type: EventType;
  /** The task after the change; on its own a delta (see {@link TaskEvent.onto}). */
  readonly task: Task;
  /** The agent that made the change (`"legato"` when the daemon did, e.g. a lease expiry). */
  readonly actor: string;
  readonly time: Date;
  /** Set on OUTPUT events. */
  readonly output: OutputChunk | null;

  constructor(fields: {
    seq: number;
    type: EventType;
    task: Task;
    actor: string;
    time: Date;
    output?: OutputChunk | null;
  }) {
    this.seq = fields.seq;
    this.type = fields.type;
    this.task = fields.task;
    this.actor = fields.actor;
    this.time = fields.time;
    this.output = fields.output ?? null;
  }

  /**
   * This event with its task made whole from the task as it was `before` it.
   *
   * Events carry only what their change may alter ({@link CARRIES}); the texts
   * and blobs they leave out keep their earlier values. Folding a task's events
   * from its CREATED one on rebuilds the task as the daemon stores it.
   */
  onto(before: Task | null | undefined): TaskEvent {
    if (before == null || this.type === EventType.CREATED) {
      return this;
    }
    const carried = CARRIES[this.type];
    const kept: Partial<Record<Blob, unknown>> = {};
    for (const name of BLOBS) {
      if (!carried.includes(name)) {
        kept[name] = before[name];
      }
    }
    const task = { ...this.task, warnings: [], ...kept } as Task;
    return new TaskEvent({ ...this, task });
  }
}

const STATUS_FROM_PROTO: ReadonlyMap<ProtoStatus, TaskStatus> = new Map([
  [ProtoStatus.TASK_STATUS_PENDING, TaskStatus.PENDING],
  [ProtoStatus.TASK_STATUS_CLAIMED, TaskStatus.CLAIMED],
  [ProtoStatus.TASK_STATUS_DONE, TaskStatus.DONE],
  [ProtoStatus.TASK_STATUS_FAILED, TaskStatus.FAILED],
  [ProtoStatus.TASK_STATUS_CANCELED, TaskStatus.CANCELED],
  [ProtoStatus.TASK_STATUS_INPUT_REQUIRED, TaskStatus.INPUT_REQUIRED],
]);
const STATUS_TO_PROTO: ReadonlyMap<TaskStatus, ProtoStatus> = new Map(
  [...STATUS_FROM_PROTO].map(([proto, status]) => [status, proto]),
);

const EVENT_FROM_PROTO: ReadonlyMap<ProtoEventType, EventType> = new Map([
  [ProtoEventType.TASK_EVENT_TYPE_CREATED, EventType.CREATED],
  [ProtoEventType.TASK_EVENT_TYPE_CLAIMED, EventType.CLAIMED],
  [ProtoEventType.TASK_EVENT_TYPE_COMPLETED, EventType.COMPLETED],
  [ProtoEventType.TASK_EVENT_TYPE_FAILED, EventType.FAILED],
  [ProtoEventType.TASK_EVENT_TYPE_CANCELED, EventType.CANCELED],
  [ProtoEventType.TASK_EVENT_TYPE_REQUEUED, EventType.REQUEUED],
  [ProtoEventType.TASK_EVENT_TYPE_OUTPUT, EventType.OUTPUT],
  [ProtoEventType.TASK_EVENT_TYPE_INPUT_REQUESTED, EventType.INPUT_REQUESTED],
  [ProtoEventType.TASK_EVENT_TYPE_INPUT_PROVIDED, EventType.INPUT_PROVIDED],
  [ProtoEventType.TASK_EVENT_TYPE_RELEASED, EventType.RELEASED],
]);

const ROLE_FROM_PROTO: ReadonlyMap<ProtoRole, Role> = new Map([
  [ProtoRole.ROLE_ADMIN, Role.ADMIN],
  [ProtoRole.ROLE_AGENT, Role.AGENT],
]);

function known<K, V>(table: ReadonlyMap<K, V>, value: K, what: string): V {
  const found = table.get(value);
  if (found === undefined) {
    throw new TypeError(`unknown ${what} ${String(value)}: the daemon is newer than this client`);
  }
  return found;
}

/** The generated enum value of a status. */
export function statusToProto(status: TaskStatus): ProtoStatus {
  return known(STATUS_TO_PROTO, status, "task status");
}

/** The generated enum value of a role. */
export function roleToProto(role: Role): ProtoRole {
  return role === Role.ADMIN ? ProtoRole.ROLE_ADMIN : ProtoRole.ROLE_AGENT;
}

const EPOCH = new Date(0);

/** A {@link Task} from the generated message. */
export function taskFromProto(message: ProtoTask): Task {
  return {
    id: message.id,
    content: message.content,
    labels: message.labels,
    context: (message.context ?? {}) as JsonObject,
    result: (message.result ?? null) as JsonObject | null,
    status: known(STATUS_FROM_PROTO, message.status, "task status"),
    error: message.error,
    createdBy: message.createdBy,
    claimedBy: message.claimedBy,
    parentId: message.parentId,
    rootId: message.rootId,
    attempt: message.attempt,
    maxAttempts: message.maxAttempts,
    version: message.version,
    createdAt: message.createdAt ?? EPOCH,
    updatedAt: message.updatedAt ?? EPOCH,
    leaseExpiresAt: message.leaseExpiresAt ?? null,
    depth: message.depth,
    deadline: message.deadline ?? null,
    outputSize: message.outputSize,
    output: message.output,
    question: message.question,
    answer: message.answer,
    warnings: message.warnings,
    released: message.released,
  };
}

/** A {@link TaskEvent} from the generated message; its task is the delta as sent. */
export function eventFromProto(message: ProtoTaskEvent): TaskEvent {
  if (message.task === undefined) {
    throw new TypeError(`event ${message.seq} has no task`);
  }
  const output = message.output;
  return new TaskEvent({
    seq: message.seq,
    type: known(EVENT_FROM_PROTO, message.type, "event type"),
    task: taskFromProto(message.task),
    actor: message.actor,
    time: message.time ?? EPOCH,
    output: output === undefined ? null : { offset: output.offset, text: output.text, attempt: output.attempt },
  });
}

/** An {@link Agent} from the generated message. */
export function agentFromProto(message: ProtoAgent): Agent {
  return {
    name: message.name,
    labels: message.labels,
    role: known(ROLE_FROM_PROTO, message.role, "role"),
    createdAt: message.createdAt ?? EPOCH,
    lastSeenAt: message.lastSeenAt ?? null,
    revoked: message.revoked,
  };
}

/**
 * `value` checked to be a JSON object, as a task's `context` or `result` must be.
 *
 * Properties set to `undefined` are left out and a `Date` becomes its ISO
 * string, as `JSON.stringify` does; anything else that is not JSON (a
 * `NaN`, a `bigint`, a `Map`, a class instance) is a TypeError naming where it is.
 */
export function toJsonObject(value: unknown, field: string): JsonObject | undefined {
  if (value === undefined || value === null) {
    return undefined;
  }
  if (!isPlainObject(value)) {
    throw new TypeError(`${field} must be an object of JSON values, not ${describe(value)}`);
  }
  return jsonValue(value, field) as JsonObject;
}

function jsonValue(value: unknown, path: string): JsonValue {
  switch (typeof value) {
    case "string":
    case "boolean":
      return value;
    case "number":
      if (!Number.isFinite(value)) {
        throw new TypeError(`${path} is ${value}, which JSON cannot hold`);
      }
      return value;
    case "object": {
      if (value === null) {
        return null;
      }
      if (value instanceof Date) {
        return value.toISOString();
      }
      if (Array.isArray(value)) {
        return value.map((item, index) => {
          if (item === undefined) {
            throw new TypeError(`${path}[${index}] is undefined, which JSON cannot hold`);
          }
          return jsonValue(item, `${path}[${index}]`);
        });
      }
      if (isPlainObject(value)) {
        const out: JsonObject = {};
        for (const [key, item] of Object.entries(value)) {
          if (item !== undefined) {
            out[key] = jsonValue(item, `${path}.${key}`);
          }
        }
        return out;
      }
      break;
    }
    default:
      break;
  }
  throw new TypeError(
    `${path} is ${describe(value)}; it must hold only JSON values (string, number, boolean, null, array, plain object)`,
  );
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== "object" || value === null) {
    return false;
  }
  const proto: unknown = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "object") return `a ${(value as object).constructor?.name ?? "object"}`;
  return `a ${typeof value}`;
}
