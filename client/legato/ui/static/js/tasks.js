// The tasks page: every task in view, live; filter by label and status.

import { getJSON } from "./api.js";
import { h, clear, age, statusBadge, titleOf } from "./dom.js";
import { Folder, fetchSummary, follow } from "./live.js";

const STATUSES = ["pending", "claimed", "input_required", "done", "failed", "canceled"];
const AGE_EVERY_MS = 15000;

function cells(task) {
  return [
    h("td", { class: "request" }, h("a", { href: `/tasks/${encodeURIComponent(task.id)}` }, titleOf(task))),
    h("td", {}, statusBadge(task.status)),
    h("td", { class: "labels" }, task.labels.join(" ")),
    h("td", {}, task.created_by),
    h("td", {}, task.claimed_by || "—"),
    h("td", { class: "age", dataset: { since: task.created_at } }, age(task.created_at)),
    h("td", { class: "num" }, `${task.attempt}/${task.max_attempts}`),
  ];
}

export function mountTasks(root, session) {
  const params = new URLSearchParams(location.search);
  const label = params.get("label") || "";
  const status = params.get("status") || "";
  const rows = new Map();
  let stream = null;
  let stopped = false;

  const labelSelect = h("select", { id: "filter-label", name: "label" }, h("option", { value: "" }, "all labels"));
  const statusSelect = h(
    "select",
    { id: "filter-status", name: "status" },
    h("option", { value: "" }, "all"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s.replace("_", " "))),
  );
  const count = h("span", { class: "count", "aria-live": "polite" });
  const body = h("tbody");
  const table = h(
    "table",
    { class: "tasks" },
    h("caption", { class: "visually-hidden" }, "Tasks, newest first"),
    h("thead", {}, h("tr", {}, ["Request", "Status", "Labels", "Creator", "Claimant", "Age", "Attempt"].map((n) => h("th", { scope: "col" }, n)))),
    body,
  );
  const notice = h("p", { class: "note" });

  // The label filter offers every label seen: the agents', the listed tasks', and
  // those of tasks that arrive later, in order.
  const offered = new Set();
  const addLabels = (names) => {
    for (const name of names) {
      if (offered.has(name)) continue;
      offered.add(name);
      const next = [...labelSelect.options].find((option) => option.value > name) ?? null;
      labelSelect.insertBefore(h("option", { value: name, selected: name === label }, name), next);
    }
  };

  const visible = (task) => !status || task.status === status;
  const showCount = () => {
    let shown = 0;
    for (const row of rows.values()) if (!row.hidden) shown += 1;
    count.textContent = `${shown} of ${rows.size} tasks`;
  };

  const place = (task) => {
    let row = rows.get(task.id);
    if (row) {
      row.replaceChildren(...cells(task));
    } else {
      row = h("tr", { dataset: { taskId: task.id } }, cells(task));
      rows.set(task.id, row);
      body.prepend(row); // new tasks are the newest
    }
    row.hidden = !visible(task);
    row.dataset.status = task.status;
  };

  const folder = new Folder({
    fetchTask: fetchSummary,
    onChange: (task) => {
      addLabels(task.labels);
      if (label && !task.labels.includes(label)) return;
      place(task);
      showCount();
    },
  });

  const setFilter = (name, value) => {
    const next = new URLSearchParams(location.search);
    if (value) next.set(name, value);
    else next.delete(name);
    const query = next.toString();
    history.pushState(null, "", query ? `/?${query}` : "/");
    window.dispatchEvent(new PopStateEvent("popstate"));
  };
  labelSelect.addEventListener("change", () => setFilter("label", labelSelect.value));
  statusSelect.addEventListener("change", () => setFilter("status", statusSelect.value));

  clear(root).append(
    h("h1", {}, "Tasks"),
    h(
      "form",
      { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
      h("label", { for: "filter-label" }, "Label"), labelSelect,
      h("label", { for: "filter-status" }, "Status"), statusSelect,
      count,
    ),
    notice,
    table,
  );

  const ages = setInterval(() => {
    const now = Date.now();
    for (const cell of body.querySelectorAll("td.age")) cell.textContent = age(cell.dataset.since, now);
  }, AGE_EVERY_MS);

  (async () => {
    const started = performance.now();
    let data;
    try {
      data = await getJSON(`/api/tasks${label ? `?label=${encodeURIComponent(label)}` : ""}`);
    } catch (error) {
      notice.textContent = error.message;
      notice.className = "error";
      notice.setAttribute("role", "alert");
      return;
    }
    if (stopped) return;
    addLabels([...data.labels, label].filter(Boolean));
    folder.load(data.tasks);
    const fragment = document.createDocumentFragment();
    for (let n = data.tasks.length - 1; n >= 0; n -= 1) {
      const task = folder.tasks.get(data.tasks[n].id);
      const row = h("tr", { dataset: { taskId: task.id, status: task.status } }, cells(task));
      row.hidden = !visible(task);
      rows.set(task.id, row);
      fragment.append(row);
    }
    body.append(fragment);
    showCount();
    if (data.truncated) notice.textContent = `Showing the oldest ${data.tasks.length} tasks; filter by label to see others.`;
    else if (!data.tasks.length) notice.textContent = "No tasks yet. They appear here as they are created.";
    table.dataset.rendered = String(rows.size);
    performance.mark("tasks-rendered", { detail: { rows: rows.size, fetchAndRenderMs: performance.now() - started } });
    const empty = !data.tasks.length;
    stream = follow(label ? { label, after: data.cursor } : { after: data.cursor }, (event) => {
      if (empty) notice.textContent = "";
      folder.event(event);
    });
  })();

  return () => {
    stopped = true;
    clearInterval(ages);
    stream?.close();
  };
}
