/**
 * `Client`: the calls to the daemon, each wrapped once, here.
 *
 * @module
 */

import { readFileSync } from "node:fs";

import {
  Channel,
  credentials as grpcCredentials,
  Metadata,
  type CallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  type ClientReadableStream,
  type ClientUnaryCall,
  type ServiceError,
} from "@grpc/grpc-js";

import { defaultAddress } from "./address.js";
import { ConfigurationError, RpcError, Status, fromServiceError, isServiceError } from "./errors.js";
import {
  AgentServiceClient,
  CreateAgentRequest,
  GetAgentRequest,
  ListAgentsRequest,
  RevokeAgentRequest,
  RotateKeyRequest,
  UpdateAgentRequest,
  WhoAmIRequest,
} from "./gen/legato/v1/agents.js";
import {
  AppendOutputRequest,
  CancelTaskRequest,
  ClaimTaskRequest,
  CompleteTaskRequest,
  CreateTaskRequest,
  FailTaskRequest,
  GetCursorRequest,
  GetTaskRequest,
  GetTaskTreeRequest,
  HeartbeatRequest,
  ListTaskEventsRequest,
  ListTasksRequest,
  ProvideInputRequest,
  ReleaseTaskRequest,
  RequestInputRequest,
  TaskServiceClient,
  WatchTasksRequest,
  type TaskEvent as ProtoTaskEvent,
} from "./gen/legato/v1/tasks.js";
import { TaskHandle } from "./handle.js";
import { Job, interruptJobsOf } from "./job.js";
import {
  agentFromProto,
  eventFromProto,
  roleToProto,
  statusToProto,
  taskFromProto,
  toJsonObject,
  type Agent,
  type JsonObject,
  type Role,
  type Task,
  type TaskEvent,
  type TaskPage,
  type TaskStatus,
} from "./models.js";
import { Deadline, Resume, duration, sleep } from "./timing.js";
import { runWorker, type JobHandler, type WorkerOptions } from "./worker.js";

/** Message limits and keepalive match the daemon's. */
const CHANNEL_OPTIONS: ChannelOptions = {
  "grpc.max_receive_message_length": 4 * 1024 * 1024,
  "grpc.max_send_message_length": 4 * 1024 * 1024,
  "grpc.keepalive_time_ms": 60_000,
  "grpc.keepalive_timeout_ms": 20_000,
  // grpc-js shares connections between channels to one address by default, so
  // a new client would inherit another's reconnect backoff after a daemon
  // restart and fail its first call. Each client keeps its own.
  "grpc.use_local_subchannel_pool": 1,
  // The daemon is local: after a restart, reconnect within a second or two,
  // not grpc-js's default of up to two minutes.
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 2_000,
};
/** How long a long-poll claim's call may run past its wait. */
const CLAIM_WAIT_MARGIN_MS = 10_000;
/** The lease of a claim when none is given; its job heartbeats three times in it. */
export const DEFAULT_LEASE_SECONDS = 60;

/** How to reach the daemon and as whom. */
export interface ClientOptions {
  /**
   * `unix:/abs/path` or `HOST:PORT`. Default: `LEGATO_ADDRESS`, else the
   * default daemon socket (`$XDG_RUNTIME_DIR/legato/legato.sock`, else
   * `$TMPDIR/legato-UID/legato.sock`).
   */
  address?: string;
  /** This agent's key (`lgt_...`). Default: `LEGATO_AGENT_KEY`. */
  apiKey?: string;
  /** Milliseconds each unary call may take; `null` for no limit. Default 30 s. */
  timeoutMs?: number | null;
  /**
   * The CA certificate (PEM) that signed the daemon's certificate: a file's
   * path, or its contents. Default `LEGATO_TLS_CA`. With any of `tlsCa`,
   * `tlsCert` and `tlsKey` the channel is TLS (without `tlsCa`, trusting the
   * system's CAs); with none of them, plaintext, as on the daemon's own socket.
   */
  tlsCa?: string | Buffer;
  /** This client's certificate (PEM, path or contents), for a daemon that requires one. Default `LEGATO_TLS_CERT`. */
  tlsCert?: string | Buffer;
  /** The private key of `tlsCert` (PEM, path or contents). Default `LEGATO_TLS_KEY`. */
  tlsKey?: string | Buffer;
  /** Channel credentials from `@grpc/grpc-js`, instead of the `tls*` options. */
  credentials?: ChannelCredentials;
  /** Extra `@grpc/grpc-js` channel options. */
  channelOptions?: ChannelOptions;
}

/** Options of {@link Client.connect}. */
export interface ConnectOptions extends ClientOptions {
  /** How long to wait for the daemon's first answer. Default 5 s. */
  connectTimeoutMs?: number;
}

/** Per-call options: a timeout instead of the client's, and a signal that cancels the call. */
export interface CallSettings {
  /** Milliseconds this call may take; `null` for no limit. Default: the client's `timeoutMs`. */
  timeoutMs?: number | null;
  /** Cancels the call; it then rejects with the signal's reason. */
  signal?: AbortSignal;
}

/** Options of {@link Client.createTask}. */
export interface CreateTaskOptions {
  /** Routing labels, each `@name`: 1 to 16. */
  labels: readonly string[];
  /** Structured input for the worker: a JSON object of at most 1 MiB. */
  context?: JsonObject;
  /** The parent task, for delegation chains. */
  parentId?: string;
  /** Makes the create safe to retry: the same key returns the original task. */
  idempotencyKey?: string;
  /** Fail the task if it has not finished by then. */
  deadline?: Date;
  /** How many claims the task gets before it fails for good (default 3). */
  maxAttempts?: number;
}

/** Options of {@link Client.delegate}: {@link CreateTaskOptions} without the labels. */
export type DelegateOptions = Omit<CreateTaskOptions, "labels">;

/** Options of {@link Client.listTasks}. */
export interface ListTasksOptions {
  labels?: readonly string[];
  statuses?: readonly TaskStatus[];
  parentId?: string;
  /** 0 means 100; at most 1000. */
  pageSize?: number;
  pageToken?: string;
}

/** Options of {@link Client.claim}. */
export interface ClaimOptions {
  /** Claim the oldest pending task with any of these labels (default: all this agent's). */
  labels?: readonly string[];
  /** Or claim this task. */
  taskId?: string;
  /** How long the claim holds without a heartbeat. Default 60 s; at most 24 hours. */
  leaseSeconds?: number;
  /** With nothing to claim, wait up to this long (at most 60 s) for a task. */
  waitSeconds?: number;
  /** Heartbeat in the background, three times per lease, until the job ends. Default true. */
  heartbeats?: boolean;
  /** Cancels the claim's wait. */
  signal?: AbortSignal;
}

/** Options of {@link Client.watch}. */
export interface WatchOptions {
  /** Events of tasks carrying any of these labels... */
  labels?: readonly string[];
  /** ...or with one of these ids. */
  taskIds?: readonly string[];
  /**
   * Replay the stored events after this seq first. Default: the latest seq when
   * iteration starts (`GetCursor`), so only what happens from then on.
   */
  afterSeq?: number;
  /** Stop with a {@link TimeoutError} after this long. */
  timeoutMs?: number;
  /** Ends the watch; the iterator then throws the signal's reason. */
  signal?: AbortSignal;
}

/** An agent and its API key, shown this once. */
export interface AgentWithKey {
  readonly agent: Agent;
  readonly apiKey: string;
}

/** PEM contents: a Buffer as it is, a string as the path of a file. */
function pem(value: string | Buffer, what: string): Buffer {
  if (Buffer.isBuffer(value)) {
    return value;
  }
  try {
    return readFileSync(value);
  } catch (error) {
    throw new ConfigurationError(`cannot read the ${what} ${value}: ${(error as Error).message}`);
  }
}

/** TLS credentials from the `tls*` options (or LEGATO_TLS_*), or plaintext without any. */
function tlsCredentials(options: ClientOptions): ChannelCredentials {
  const env = process.env;
  const ca = options.tlsCa ?? (env.LEGATO_TLS_CA || undefined);
  const cert = options.tlsCert ?? (env.LEGATO_TLS_CERT || undefined);
  const key = options.tlsKey ?? (env.LEGATO_TLS_KEY || undefined);
  if (ca === undefined && cert === undefined && key === undefined) {
    return grpcCredentials.createInsecure();
  }
  if ((cert === undefined) !== (key === undefined)) {
    throw new ConfigurationError(
      "a client certificate needs its key and a key its certificate: give both tlsCert and tlsKey " +
        "(or LEGATO_TLS_CERT and LEGATO_TLS_KEY)",
    );
  }
  return grpcCredentials.createSsl(
    ca === undefined ? null : pem(ca, "CA certificate"),
    key === undefined ? null : pem(key, "client key"),
    cert === undefined ? null : pem(cert, "client certificate"),
  );
}

type UnaryMethod<Request, Response> = (
  request: Request,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Response) => void,
) => ClientUnaryCall;

/**
 * A client of the legato daemon.
 *
 * ```ts
 * const client = await Client.connect({ apiKey: process.env.CODER_KEY });
 * const handle = await client.delegate("@researcher", "current RPM for Tier 1?");
 * const task = await handle.result({ timeoutMs: 60_000 });
 * ```
 */
export class Client {
  /** Where the daemon is: `unix:/path` or `HOST:PORT`. */
  readonly address: string;
  /** Milliseconds each unary call may take (`null`: no limit). */
  readonly timeoutMs: number | null;
  private readonly channel: Channel;
  private readonly tasks: TaskServiceClient;
  private readonly agents: AgentServiceClient;
  // Sent with every call. An insecure channel takes no call credentials, so the
  // key travels as plain metadata; the daemon keeps only its hash.
  private readonly metadata: Metadata;
  private closedFlag = false;

  /**
   * A client that connects on its first call. {@link Client.connect} also
   * checks that the daemon answers.
   *
   * @throws ConfigurationError without an API key, or when the default
   *   socket's directory belongs to another user
   */
  constructor(options: ClientOptions = {}) {
    const key = options.apiKey ?? process.env.LEGATO_AGENT_KEY ?? "";
    if (!key) {
      throw new ConfigurationError(
        "no API key: pass apiKey or set LEGATO_AGENT_KEY (`legato agent add NAME --label @LABEL` prints one)",
      );
    }
    if (/\s/.test(key)) {
      throw new ConfigurationError("the API key has white space in it; paste it as printed (lgt_...)");
    }
    this.address = options.address || defaultAddress();
    this.timeoutMs = options.timeoutMs === undefined ? 30_000 : options.timeoutMs;
    this.metadata = new Metadata();
    this.metadata.set("authorization", `Bearer ${key}`);
    const channelCredentials = options.credentials ?? tlsCredentials(options);
    this.channel = new Channel(this.address, channelCredentials, {
      ...CHANNEL_OPTIONS,
      ...options.channelOptions,
    });
    const shared = { channelOverride: this.channel };
    this.tasks = new TaskServiceClient(this.address, channelCredentials, shared);
    this.agents = new AgentServiceClient(this.address, channelCredentials, shared);
  }

  /**
   * Creates a client and waits until the daemon answers (`WhoAmI`).
   *
   * @throws UnavailableError if the daemon does not answer in `connectTimeoutMs`
   * @throws UnauthenticatedError if it does not know the key
   */
  static async connect(options: ConnectOptions = {}): Promise<Client> {
    const client = new Client(options);
    try {
      await client.unary(client.agents.whoAmI.bind(client.agents), WhoAmIRequest.fromPartial({}), {
        timeoutMs: options.connectTimeoutMs ?? 5_000,
      });
    } catch (error) {
      client.close();
      throw error;
    }
    return client;
  }

  /** Whether {@link Client.close} was called. */
  get closed(): boolean {
    return this.closedFlag;
  }

  /**
   * Closes the channel; the client cannot be used afterwards. Its jobs' background
   * heartbeats stop and the jobs are interrupted; the daemon requeues those
   * tasks when their leases end.
   */
  close(): void {
    if (!this.closedFlag) {
      this.closedFlag = true;
      interruptJobsOf(this);
      this.channel.close();
    }
  }

  private checkOpen(): void {
    if (this.closedFlag) {
      throw new Error("this legato client is closed; create a new one");
    }
  }

  /** The one choke point of unary calls: metadata, deadline, cancellation, error mapping. */
  private unary<Request, Response>(
    method: UnaryMethod<Request, Response>,
    request: Request,
    { timeoutMs = this.timeoutMs, signal }: CallSettings = {},
  ): Promise<Response> {
    this.checkOpen();
    signal?.throwIfAborted();
    return new Promise<Response>((resolve, reject) => {
      const options: Partial<CallOptions> = timeoutMs == null ? {} : { deadline: Date.now() + timeoutMs };
      const onAbort = (): void => call.cancel();
      const call = method(request, this.metadata.clone(), options, (error, response) => {
        signal?.removeEventListener("abort", onAbort);
        if (error === null) {
          resolve(response);
        } else if (signal?.aborted && error.code === Status.CANCELLED) {
          reject(signal.reason);
        } else {
          reject(fromServiceError(error, this.address));
        }
      });
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  // -- tasks ------------------------------------------------------------------

  /**
   * Creates a task routed to `labels` and returns a handle to await its result.
   *
   * @param content - what is asked, in plain text (at most 64 KiB)
   */
  async createTask(content: string, options: CreateTaskOptions, settings?: CallSettings): Promise<TaskHandle> {
    const labels = typeof options.labels === "string" ? [options.labels] : [...options.labels];
    const request = CreateTaskRequest.fromPartial({
      content,
      labels,
      context: toJsonObject(options.context, "context"),
      parentId: options.parentId ?? "",
      idempotencyKey: options.idempotencyKey ?? "",
      maxAttempts: options.maxAttempts ?? 0,
      deadline: options.deadline,
    });
    const task = taskFromProto(await this.unary(this.tasks.createTask.bind(this.tasks), request, settings));
    return new TaskHandle(this, task.id, task);
  }

  /**
   * Hands `content` to whoever holds `label`; returns the handle to follow it.
   *
   * `await handle.result()` waits for the answer, `handle.output()` streams it
   * as it is written, `await handle.answer(...)` replies to a question back.
   */
  delegate(label: string, content: string, options: DelegateOptions = {}, settings?: CallSettings): Promise<TaskHandle> {
    return this.createTask(content, { ...options, labels: [label] }, settings);
  }

  /** A handle to an existing task. */
  getHandle(taskId: string): TaskHandle {
    return new TaskHandle(this, taskId);
  }

  /** One task as it is now, with the current attempt's output. */
  async getTask(taskId: string, settings?: CallSettings): Promise<Task> {
    const request = GetTaskRequest.fromPartial({ id: taskId });
    return taskFromProto(await this.unary(this.tasks.getTask.bind(this.tasks), request, settings));
  }

  /** One page of tasks, oldest first, and the event cursor of the listing. */
  async listTasks(options: ListTasksOptions = {}, settings?: CallSettings): Promise<TaskPage> {
    const request = ListTasksRequest.fromPartial({
      labels: [...(options.labels ?? [])],
      statuses: (options.statuses ?? []).map(statusToProto),
      parentId: options.parentId ?? "",
      pageSize: options.pageSize ?? 0,
      pageToken: options.pageToken ?? "",
    });
    const response = await this.unary(this.tasks.listTasks.bind(this.tasks), request, settings);
    return {
      tasks: response.tasks.map(taskFromProto),
      nextPageToken: response.nextPageToken,
      cursor: response.cursor,
    };
  }

  /**
   * Claims the oldest pending task with any of `labels` (default: all this
   * agent's labels), or `taskId`. With nothing pending, waits up to
   * `waitSeconds` (at most 60) for a task; `null` if none came.
   *
   * The job heartbeats in the background (three times per lease) and watches
   * its task until it is completed, failed or released; when the task ends
   * under the claim or the lease is lost, `job.signal` aborts. Until then the
   * job keeps the process alive: finish it, or close the client.
   */
  async claim(options: ClaimOptions = {}): Promise<Job | null> {
    const leaseSeconds = options.leaseSeconds ?? DEFAULT_LEASE_SECONDS;
    const request = ClaimTaskRequest.fromPartial({
      labels: [...(options.labels ?? [])],
      id: options.taskId ?? "",
      lease: duration(leaseSeconds),
      wait: duration(options.waitSeconds),
    });
    // A long-poll claim must outlive its wait, whatever the unary timeout is.
    const waitMs = (options.waitSeconds ?? 0) * 1000;
    const timeoutMs =
      waitMs && this.timeoutMs !== null ? Math.max(this.timeoutMs, waitMs + CLAIM_WAIT_MARGIN_MS) : this.timeoutMs;
    const response = await this.unary(this.tasks.claimTask.bind(this.tasks), request, {
      timeoutMs,
      signal: options.signal,
    });
    if (response.task === undefined) {
      return null;
    }
    const job = new Job(this, taskFromProto(response.task), response.leaseToken);
    if (options.heartbeats ?? true) {
      job.startHeartbeats(leaseSeconds);
    }
    return job;
  }

  /**
   * Extends a lease. `cancelRequested` means the task ended under the claim
   * (canceled, or failed at its deadline): stop working on it.
   */
  async heartbeat(
    taskId: string,
    leaseToken: string,
    options: { leaseSeconds?: number } = {},
    settings?: CallSettings,
  ): Promise<{ task: Task; cancelRequested: boolean }> {
    const request = HeartbeatRequest.fromPartial({
      id: taskId,
      leaseToken,
      lease: duration(options.leaseSeconds),
    });
    const response = await this.unary(this.tasks.heartbeat.bind(this.tasks), request, settings);
    if (response.task === undefined) {
      throw new RpcError("the daemon answered a heartbeat without the task", Status.INTERNAL);
    }
    return { task: taskFromProto(response.task), cancelRequested: response.cancelRequested };
  }

  /** Finishes a claimed task with its result. */
  async completeTask(taskId: string, leaseToken: string, result?: JsonObject, settings?: CallSettings): Promise<Task> {
    const request = CompleteTaskRequest.fromPartial({
      id: taskId,
      leaseToken,
      result: toJsonObject(result ?? {}, "result"),
    });
    return taskFromProto(await this.unary(this.tasks.completeTask.bind(this.tasks), request, settings));
  }

  /** Fails a claimed task; a retryable failure requeues it while attempts remain. */
  async failTask(
    taskId: string,
    leaseToken: string,
    error: string,
    options: { retryable?: boolean } = {},
    settings?: CallSettings,
  ): Promise<Task> {
    const request = FailTaskRequest.fromPartial({
      id: taskId,
      leaseToken,
      error,
      retryable: options.retryable ?? false,
    });
    return taskFromProto(await this.unary(this.tasks.failTask.bind(this.tasks), request, settings));
  }

  /** Hands a claimed task back: PENDING again, and the attempt does not count against `maxAttempts`. */
  async releaseTask(taskId: string, leaseToken: string, reason = "", settings?: CallSettings): Promise<Task> {
    const request = ReleaseTaskRequest.fromPartial({ id: taskId, leaseToken, reason });
    return taskFromProto(await this.unary(this.tasks.releaseTask.bind(this.tasks), request, settings));
  }

  /** Cancels a task and, unless `keepChildren`, its unfinished descendants. */
  async cancelTask(
    taskId: string,
    options: { reason?: string; keepChildren?: boolean } = {},
    settings?: CallSettings,
  ): Promise<Task> {
    const request = CancelTaskRequest.fromPartial({
      id: taskId,
      reason: options.reason ?? "",
      keepChildren: options.keepChildren ?? false,
    });
    return taskFromProto(await this.unary(this.tasks.cancelTask.bind(this.tasks), request, settings));
  }

  /** Appends a chunk to a claimed task's output; returns the output's size after it (UTF-8 bytes). */
  async appendOutput(taskId: string, leaseToken: string, text: string, settings?: CallSettings): Promise<number> {
    const request = AppendOutputRequest.fromPartial({ id: taskId, leaseToken, text });
    return (await this.unary(this.tasks.appendOutput.bind(this.tasks), request, settings)).outputSize;
  }

  /** Asks the creator a question; the task waits INPUT_REQUIRED for the answer. */
  async requestInput(taskId: string, leaseToken: string, question: string, settings?: CallSettings): Promise<Task> {
    const request = RequestInputRequest.fromPartial({ id: taskId, leaseToken, question });
    return taskFromProto(await this.unary(this.tasks.requestInput.bind(this.tasks), request, settings));
  }

  /** Answers the question a task's claimant asked (creator or admin). */
  async provideInput(taskId: string, answer: string, settings?: CallSettings): Promise<Task> {
    const request = ProvideInputRequest.fromPartial({ id: taskId, answer });
    return taskFromProto(await this.unary(this.tasks.provideInput.bind(this.tasks), request, settings));
  }

  /** The task and the descendants this agent sees, each after its parent (every page). */
  async getTaskTree(taskId: string, settings?: CallSettings): Promise<Task[]> {
    const tasks: Task[] = [];
    let pageToken = "";
    do {
      const request = GetTaskTreeRequest.fromPartial({ id: taskId, pageSize: 1000, pageToken });
      const response = await this.unary(this.tasks.getTaskTree.bind(this.tasks), request, settings);
      tasks.push(...response.tasks.map(taskFromProto));
      pageToken = response.nextPageToken;
    } while (pageToken);
    return tasks;
  }

  /** Every stored event of a task, oldest first: who created, claimed, completed or canceled it, and when. */
  async taskHistory(taskId: string, settings?: CallSettings): Promise<TaskEvent[]> {
    const events: TaskEvent[] = [];
    let afterSeq = 0;
    do {
      const request = ListTaskEventsRequest.fromPartial({ id: taskId, afterSeq, pageSize: 1000 });
      const response = await this.unary(this.tasks.listTaskEvents.bind(this.tasks), request, settings);
      events.push(...response.events.map(eventFromProto));
      afterSeq = response.nextAfterSeq;
    } while (afterSeq);
    return events;
  }

  /** The seq of the latest event: `watch({ afterSeq: cursor })` misses nothing from now on. */
  async getCursor(settings?: CallSettings): Promise<number> {
    const request = GetCursorRequest.fromPartial({});
    return (await this.unary(this.tasks.getCursor.bind(this.tasks), request, settings)).cursor;
  }

  /**
   * Task events in seq order, resuming by itself when the stream drops
   * (UNAVAILABLE, e.g. a daemon restart, or RESOURCE_EXHAUSTED for a watcher
   * that fell behind) from the last event it delivered: none is missed or
   * repeated across reconnects.
   *
   * Events are deltas: {@link TaskEvent.onto} folds one onto the task before it.
   *
   * ```ts
   * for await (const event of client.watch({ labels: ["@researcher"] })) {
   *   console.log(event.seq, event.type, event.task.id, event.task.status);
   * }
   * ```
   */
  async *watch(options: WatchOptions = {}): AsyncGenerator<TaskEvent, void, undefined> {
    const { signal } = options;
    const deadline = new Deadline(options.timeoutMs);
    let afterSeq = options.afterSeq ?? (await this.getCursor({ signal }));
    const resume = new Resume();
    for (;;) {
      this.checkOpen();
      const left = deadline.remaining();
      const request = WatchTasksRequest.fromPartial({
        labels: [...(options.labels ?? [])],
        taskIds: [...(options.taskIds ?? [])],
        afterSeq,
      });
      const call: ClientReadableStream<ProtoTaskEvent> = this.tasks.watchTasks(
        request,
        this.metadata.clone(),
        left === null ? {} : { deadline: Date.now() + left },
      );
      const onAbort = (): void => call.cancel();
      signal?.addEventListener("abort", onAbort, { once: true });
      let failure: RpcError | null = null;
      try {
        for await (const message of call as AsyncIterable<ProtoTaskEvent>) {
          const event = eventFromProto(message);
          afterSeq = event.seq;
          resume.progressed();
          yield event;
        }
      } catch (error) {
        if (signal?.aborted) {
          throw signal.reason;
        }
        if (!isServiceError(error)) {
          throw error;
        }
        failure = fromServiceError(error, this.address);
      } finally {
        signal?.removeEventListener("abort", onAbort);
        // grpc-js reports the cancel as an 'error' event; nobody listens any more.
        call.on("error", () => {});
        call.cancel();
      }
      // A stream the daemon ends without an error is resumed like a dropped one.
      failure ??= new RpcError("the watch stream ended", Status.UNAVAILABLE);
      await sleep(resume.delayAfter(failure, deadline), signal);
    }
  }

  // -- workers ----------------------------------------------------------------

  /**
   * Runs `handler` on every job for `labels` (default: this agent's), one at a
   * time per `concurrency`, until `options.signal` aborts.
   *
   * The task completes with what the handler returns, or fails with what it
   * throws. An ordinary ending never stops the worker: when a task is canceled
   * meanwhile, the handler's signal aborts, the worker logs it and takes the
   * next. On stop, jobs still unfinished are released for another worker.
   * It rejects only for what no retry fixes (e.g. a label this agent does not hold).
   */
  runWorker(labels: readonly string[], handler: JobHandler, options: WorkerOptions = {}): Promise<void> {
    return runWorker(this, labels, handler, options);
  }

  // -- agents -----------------------------------------------------------------

  /** The agent this client's key belongs to. */
  async whoami(settings?: CallSettings): Promise<Agent> {
    const request = WhoAmIRequest.fromPartial({});
    return agentFromProto(await this.unary(this.agents.whoAmI.bind(this.agents), request, settings));
  }

  /** Creates an agent (admin only); returns it and its API key, shown this once. */
  async createAgent(
    name: string,
    options: { labels?: readonly string[]; role?: Role } = {},
    settings?: CallSettings,
  ): Promise<AgentWithKey> {
    const request = CreateAgentRequest.fromPartial({
      name,
      labels: [...(options.labels ?? [])],
      role: roleToProto(options.role ?? "agent"),
    });
    const response = await this.unary(this.agents.createAgent.bind(this.agents), request, settings);
    if (response.agent === undefined) {
      throw new RpcError("the daemon answered CreateAgent without the agent", Status.INTERNAL);
    }
    return { agent: agentFromProto(response.agent), apiKey: response.apiKey };
  }

  /** Every agent (admin only). */
  async listAgents(options: { includeRevoked?: boolean } = {}, settings?: CallSettings): Promise<Agent[]> {
    const request = ListAgentsRequest.fromPartial({ includeRevoked: options.includeRevoked ?? false });
    const response = await this.unary(this.agents.listAgents.bind(this.agents), request, settings);
    return response.agents.map(agentFromProto);
  }

  /** One agent (admin, or the agent itself). */
  async getAgent(name: string, settings?: CallSettings): Promise<Agent> {
    const request = GetAgentRequest.fromPartial({ name });
    return agentFromProto(await this.unary(this.agents.getAgent.bind(this.agents), request, settings));
  }

  /** Replaces an agent's labels and/or role (admin only). */
  async updateAgent(
    name: string,
    changes: { labels?: readonly string[]; role?: Role },
    settings?: CallSettings,
  ): Promise<Agent> {
    const paths = [changes.labels !== undefined && "labels", changes.role !== undefined && "role"].filter(
      (path): path is string => path !== false,
    );
    if (paths.length === 0) {
      throw new TypeError("give labels or role to change");
    }
    const request = UpdateAgentRequest.fromPartial({
      name,
      labels: [...(changes.labels ?? [])],
      role: changes.role === undefined ? 0 : roleToProto(changes.role),
      updateMask: paths,
    });
    return agentFromProto(await this.unary(this.agents.updateAgent.bind(this.agents), request, settings));
  }

  /** Revokes an agent for good: its key stops working, its watch streams end (admin only). */
  async revokeAgent(name: string, settings?: CallSettings): Promise<Agent> {
    const request = RevokeAgentRequest.fromPartial({ name });
    return agentFromProto(await this.unary(this.agents.revokeAgent.bind(this.agents), request, settings));
  }

  /** A new key for `name` (default: this client's agent); the old one stops at once. */
  async rotateKey(name = "", settings?: CallSettings): Promise<AgentWithKey> {
    const request = RotateKeyRequest.fromPartial({ name });
    const response = await this.unary(this.agents.rotateKey.bind(this.agents), request, settings);
    if (response.agent === undefined) {
      throw new RpcError("the daemon answered RotateKey without the agent", Status.INTERNAL);
    }
    return { agent: agentFromProto(response.agent), apiKey: response.apiKey };
  }
}
