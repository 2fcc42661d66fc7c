// The task page: the request and context, the output as it streams, the
// result, the delegation tree, the history; answer a question, cancel.

import { getJSON, postJSON } from "./api.js";
import { h, clear, when, statusBadge, titleOf, TERMINAL } from "./dom.js";
import { jsonTree } from "./json-tree.js";
import { Folder, follow } from "./live.js";

const taskPath = (id) => `/tasks/${encodeURIComponent(id)}`;
const apiPath = (id) => `/api/tasks/${encodeURIComponent(id)}`;

async function fetchFull(id) {
  return (await getJSON(`${apiPath(id)}/full`)).task;
}

function section(title, ...children) {
  const heading = h("h2", {}, title);
  return h("section", { "aria-label": title }, heading, ...children);
}

/** One line of the history; a run of output chunks is one line that grows. */
function historyEntry(event) {
  const detail =
    event.type === "output" ? `${event.output?.size ?? 0} bytes` :
    event.type === "input_requested" ? event.task.question :
    event.type === "input_provided" ? event.task.answer :
    ["failed", "canceled", "requeued", "released"].includes(event.type) ? event.task.error : "";
  const entry = h(
    "li",
    { dataset: { type: event.type, seq: event.seq, attempt: event.task.attempt } },
    h("time", { datetime: event.time }, when(event.time)),
    h("span", { class: "event" }, event.type.replace("_", " ")),
    h("span", { class: "actor" }, `by ${event.actor}`),
    h("span", { class: "attempt" }, `attempt ${event.task.attempt}`),
    detail ? h("span", { class: "detail" }, detail) : null,
  );
  entry.chunks = 1;
  entry.bytes = event.output?.size ?? 0;
  return entry;
}

export function mountTask(root, id, session) {
  let stream = null;
  let stopped = false;
  clear(root).append(h("p", { class: "note" }, "Loading…"));

  (async () => {
    let data;
    try {
      data = await getJSON(apiPath(id));
    } catch (error) {
      clear(root).append(h("h1", {}, "Task"), h("p", { class: "error", role: "alert" }, error.message));
      return;
    }
    if (stopped) return;
    const view = render(root, data);
    stream = follow({ task: id, after: data.cursor }, (event) => view.event(event));
  })();

  return () => {
    stopped = true;
    stream?.close();
  };

  function render(root, data) {
    const parts = {
      title: h("h1", {}),
      status: h("span", {}),
      meta: h("dl", { class: "meta" }),
      question: h("p", { class: "question" }),
      questionSection: null,
      answer: h("textarea", { id: "answer", name: "answer", rows: 3, required: true }),
      answerError: h("p", { class: "error", role: "alert", hidden: true }),
      attempt: h("span", { class: "note" }),
      output: h("pre", { class: "output", role: "log", "aria-label": "Output", "aria-live": "off" }),
      result: h("div", {}),
      actions: null,
      keepChildren: h("input", { type: "checkbox", id: "keep-children", name: "keep_children" }),
      actionError: h("p", { class: "error", role: "alert", hidden: true }),
      tree: h("div", { class: "cards" }),
      history: h("ol", { class: "timeline" }),
      parent: h("p", { class: "crumbs" }),
    };
    const cards = new Map();
    let lastSeq = 0;

    const sendAnswer = async (event) => {
      event.preventDefault();
      parts.answerError.hidden = true;
      try {
        await postJSON(`${apiPath(id)}/answer`, { answer: parts.answer.value });
        parts.answer.value = "";
      } catch (error) {
        parts.answerError.textContent = error.message;
        parts.answerError.hidden = false;
      }
    };
    const cancel = async () => {
      parts.actionError.hidden = true;
      try {
        await postJSON(`${apiPath(id)}/cancel`, { keep_children: parts.keepChildren.checked });
      } catch (error) {
        parts.actionError.textContent = error.message;
        parts.actionError.hidden = false;
      }
    };

    parts.questionSection = section(
      "Question",
      parts.question,
      h(
        "form",
        { class: "answer", onsubmit: sendAnswer },
        h("label", { for: "answer" }, "Answer"),
        parts.answer,
        h("button", { type: "submit" }, "Send answer"),
        parts.answerError,
      ),
    );
    parts.actions = h(
      "div",
      { class: "actions" },
      h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel task"),
      h("label", { for: "keep-children", class: "inline" }, parts.keepChildren, " keep children running"),
      parts.actionError,
    );

    const task = data.task;
    clear(root).append(
      parts.parent,
      h("div", { class: "heading" }, parts.title, parts.status),
      parts.meta,
      parts.actions,
      parts.questionSection,
      section("Request", h("pre", { class: "content" }, task.content)),
      section("Context", Object.keys(task.context || {}).length ? jsonTree(task.context, "Context") : h("p", { class: "note" }, "none")),
      section("Output", parts.attempt, parts.output),
      section("Result", parts.result),
      section("Delegated tasks", parts.tree),
      section("History", parts.history),
    );

    const showTask = (task, appended) => {
      parts.title.textContent = titleOf(task);
      parts.status.replaceChildren(statusBadge(task.status));
      const facts = [
        ["Labels", task.labels.join(" ")],
        ["Created by", task.created_by],
        ["Claimed by", task.claimed_by || "—"],
        ["Attempt", `${task.attempt} of ${task.max_attempts}${task.released ? ` (${task.released} handed back)` : ""}`],
        ["Created", when(task.created_at)],
        ["Updated", when(task.updated_at)],
        ["Deadline", task.deadline ? when(task.deadline) : "none"],
        ["Id", task.id],
      ];
      parts.meta.replaceChildren(...facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
      parts.parent.replaceChildren(
        h(
          "span",
          {},
          h("a", { href: "/" }, "All tasks"),
          task.parent_id ? [" · ", h("a", { href: taskPath(task.parent_id) }, "Parent task")] : null,
          task.root_id && task.root_id !== task.id && task.root_id !== task.parent_id
            ? [" · ", h("a", { href: taskPath(task.root_id) }, "Root task")]
            : null,
        ),
      );
      parts.questionSection.hidden = task.status !== "input_required";
      parts.question.textContent = task.question;
      parts.actions.hidden = TERMINAL.has(task.status);
      parts.attempt.textContent = `attempt ${task.attempt}, ${task.outputBytes} bytes`;
      if (appended) parts.output.append(appended);
      else parts.output.textContent = task.output;
      if (task.status === "done") parts.result.replaceChildren(jsonTree(task.result ?? {}, "Result"));
      else if (task.error) parts.result.replaceChildren(h("p", { class: "error" }, task.error));
      else parts.result.replaceChildren(h("p", { class: "note" }, "not finished yet"));
    };

    const card = (task) => {
      const entry = {
        title: h("a", { href: taskPath(task.id) }),
        agent: h("span", { class: "agent" }),
        labels: h("span", { class: "labels" }),
        status: h("span", {}),
        size: h("span", { class: "note" }),
        output: h("pre", { class: "output", role: "log", "aria-label": `Output of ${titleOf(task)}` }),
        children: h("div", { class: "cards" }),
      };
      entry.node = h(
        "article",
        { class: "card", dataset: { taskId: task.id }, "aria-label": titleOf(task) },
        h("header", {}, entry.title, entry.status),
        h("p", { class: "card-meta" }, entry.agent, " · ", entry.labels),
        h("details", {}, h("summary", {}, "Output ", entry.size), entry.output),
        entry.children,
      );
      const parent = cards.get(task.parent_id);
      (parent ? parent.children : parts.tree).append(entry.node);
      cards.set(task.id, entry);
      return entry;
    };

    const showChild = (task, appended) => {
      const entry = cards.get(task.id) ?? card(task);
      entry.title.textContent = titleOf(task);
      entry.agent.textContent = task.claimed_by ? `claimed by ${task.claimed_by}` : "unclaimed";
      entry.labels.textContent = task.labels.join(" ");
      entry.status.replaceChildren(statusBadge(task.status));
      entry.size.textContent = `(${task.outputBytes} bytes, attempt ${task.attempt})`;
      if (appended) entry.output.append(appended);
      else entry.output.textContent = task.output;
    };

    const addHistory = (event) => {
      if (event.seq <= lastSeq) return;
      lastSeq = event.seq;
      const last = parts.history.lastElementChild;
      if (event.type === "output" && last?.dataset.type === "output" && last.dataset.attempt === String(event.task.attempt)) {
        last.chunks += 1;
        last.bytes += event.output?.size ?? 0;
        last.querySelector(".detail").textContent = `${last.chunks} chunks, ${last.bytes} bytes`;
        return;
      }
      parts.history.append(historyEntry(event));
    };

    const folder = new Folder({
      fetchTask: fetchFull,
      onChange: (changed, event, appended) => {
        if (changed.id === id) showTask(changed, appended);
        else showChild(changed, appended);
      },
    });
    folder.load([data.task, ...data.tree]);
    showTask(folder.tasks.get(id), "");
    for (const child of data.tree) showChild(folder.tasks.get(child.id), "");
    if (!data.tree.length) parts.tree.append(h("p", { class: "note empty" }, "none yet"));
    for (const event of data.history) addHistory(event);

    return {
      event(event) {
        if (event.task.id !== id && !cards.size) parts.tree.querySelector(".empty")?.remove();
        folder.event(event);
        if (event.task.id === id) addHistory(event);
      },
    };
  }
}
