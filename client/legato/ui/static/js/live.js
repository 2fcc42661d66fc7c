// Live updates: one event stream per page, and folding its deltas onto the tasks held.
//
// The stream's SSE `id` is the daemon seq to resume from: the browser sends it
// back as Last-Event-ID when it reconnects (the UI or the daemon restarted, the
// laptop slept), and the server replays from there. A replay may repeat what
// the page has; `Folder` drops it by the task's `version`, which grows by one
// with every event of a task. A version that jumps means something is
// missing: the task is read again. So a reconnect is exact.

import { getJSON } from "./api.js";

const encoder = new TextEncoder();
const bytes = (text) => encoder.encode(text).length;

let indicator = null;

/** Where the page says whether it is live. */
export function useIndicator(node) {
  indicator = node;
}

function show(state, detail = "") {
  if (!indicator) return;
  indicator.dataset.state = state;
  const texts = { live: "live", connecting: "connecting…", reconnecting: "reconnecting…", error: detail };
  indicator.textContent = texts[state] ?? state;
  indicator.title = detail;
}

/**
 * Opens the page's event stream at `params.after` (a snapshot's cursor).
 * `onEvent` receives each event; returns {close()}.
 */
export function follow(params, onEvent) {
  let source = null;
  let resumeAt = params.after;
  let closed = false;
  let retry = null;

  const open = () => {
    const query = new URLSearchParams({ ...params, after: String(resumeAt) });
    show("connecting");
    source = new EventSource(`/api/events?${query}`);
    source.addEventListener("hello", () => show("live"));
    source.addEventListener("task", (message) => {
      resumeAt = Number(message.lastEventId);
      onEvent(JSON.parse(message.data));
    });
    source.addEventListener("fatal", (message) => {
      closed = true;
      source.close();
      show("error", JSON.parse(message.data).error);
    });
    source.onerror = () => {
      if (closed) return;
      show("reconnecting");
      // The browser reconnects by itself after a network error (with
      // Last-Event-ID). After an HTTP error it gives up: look why, then
      // reopen from the last seq seen.
      if (source.readyState === EventSource.CLOSED) {
        retry = setTimeout(reopen, 1000);
      }
    };
  };

  const reopen = async () => {
    try {
      await getJSON("/api/session");
    } catch (error) {
      if (error?.status === 401) {
        show("error", "signed out: open the link `legato ui` printed");
        return;
      }
    }
    if (!closed) open();
  };

  open();
  return {
    close() {
      closed = true;
      clearTimeout(retry);
      source?.close();
    },
  };
}

function prepare(task) {
  task.output ??= "";
  task.outputBytes = bytes(task.output);
  return task;
}

/**
 * The tasks a page holds, kept current by events.
 *
 * `onChange(task, event, appended)` is called after a task changed: `event` is
 * null when the task was read whole, `appended` the output text just added.
 */
export class Folder {
  constructor({ fetchTask, onChange }) {
    this.tasks = new Map();
    this.fetchTask = fetchTask;
    this.onChange = onChange;
    // Events of a task being read again wait here, in order.
    this.waiting = new Map();
  }

  load(tasks) {
    for (const task of tasks) this.tasks.set(task.id, prepare(task));
  }

  event(event) {
    const id = event.task.id;
    const queue = this.waiting.get(id);
    if (queue) {
      queue.push(event);
      return;
    }
    const known = this.tasks.get(id);
    if (!known) {
      if (event.type !== "created") return this.reread(id, event);
      const task = prepare({ ...event.task });
      this.tasks.set(id, task);
      return this.onChange(task, event, "");
    }
    const delta = event.task;
    if (delta.version <= known.version) return; // had it already
    if (delta.version > known.version + 1) return this.reread(id, event); // missed one
    let appended = "";
    const chunk = event.output;
    if (chunk && chunk.text !== undefined) {
      const have = delta.attempt === known.attempt ? known.outputBytes : 0;
      if (chunk.attempt === delta.attempt && chunk.offset === have) appended = chunk.text;
      else if (chunk.offset > have) return this.reread(id, event);
    }
    if (delta.attempt !== known.attempt) {
      known.output = ""; // each attempt's output starts afresh
      known.outputBytes = 0;
    }
    Object.assign(known, delta);
    if (appended) {
      known.output += appended;
      known.outputBytes += chunk.size;
    }
    this.onChange(known, event, appended);
  }

  async reread(id, event) {
    this.waiting.set(id, [event]);
    let task = null;
    try {
      task = await this.fetchTask(id);
    } catch {
      task = null; // gone from view: its events are dropped
    }
    const queued = this.waiting.get(id);
    this.waiting.delete(id);
    if (!task) return;
    const known = this.tasks.get(id);
    if (!known || task.version >= known.version) {
      this.tasks.set(id, prepare(task));
      this.onChange(this.tasks.get(id), null, "");
    }
    for (const waiting of queued) this.event(waiting);
  }
}

/** Reads one task's summary (the list's and agents' pages). */
export async function fetchSummary(id) {
  return (await getJSON(`/api/tasks/${encodeURIComponent(id)}/summary`)).task;
}
