// The agents page: labels, role, last seen, and what each holds now (admin only).

import { ApiError, getJSON } from "./api.js";
import { h, clear, age, statusBadge, titleOf } from "./dom.js";
import { follow } from "./live.js";

// Events that change who holds what; on one, the page reads the agents again
// (at most this often).
const HOLDING = new Set(["claimed", "completed", "failed", "canceled", "requeued", "released", "input_requested", "input_provided"]);
const REREAD_MS = 300;

function row(agent) {
  const holds = agent.holds.length
    ? h("ul", { class: "holds" }, agent.holds.map((task) => h("li", {}, h("a", { href: `/tasks/${encodeURIComponent(task.id)}` }, titleOf(task)), " ", statusBadge(task.status))))
    : h("span", { class: "note" }, "nothing");
  return h(
    "tr",
    { dataset: { agent: agent.name }, class: agent.revoked ? "revoked" : null },
    h("th", { scope: "row" }, agent.name, agent.revoked ? h("span", { class: "note" }, " (revoked)") : null),
    h("td", {}, agent.role),
    h("td", { class: "labels" }, agent.labels.join(" ") || "—"),
    h("td", {}, agent.last_seen_at ? `${age(agent.last_seen_at)} ago` : "never"),
    h("td", {}, holds),
  );
}

export function mountAgents(root, session) {
  let stream = null;
  let stopped = false;
  let timer = null;
  const body = h("tbody");
  clear(root).append(h("h1", {}, "Agents"));

  const load = async () => {
    const data = await getJSON("/api/agents");
    body.replaceChildren(...data.agents.map(row));
    return data;
  };

  (async () => {
    let data;
    try {
      data = await load();
    } catch (error) {
      const forbidden = error instanceof ApiError && error.status === 403;
      root.append(h("p", { class: forbidden ? "note" : "error", role: "alert" }, error.message));
      return;
    }
    if (stopped) return;
    root.append(
      h(
        "table",
        { class: "agents" },
        h("caption", { class: "visually-hidden" }, "Agents"),
        h("thead", {}, h("tr", {}, ["Agent", "Role", "Labels", "Last seen", "Holds now"].map((n) => h("th", { scope: "col" }, n)))),
        body,
      ),
    );
    stream = follow({ after: data.cursor }, (event) => {
      if (!HOLDING.has(event.type) || timer) return;
      timer = setTimeout(async () => {
        timer = null;
        if (!stopped) await load().catch(() => {});
      }, REREAD_MS);
    });
  })();

  return () => {
    stopped = true;
    clearTimeout(timer);
    stream?.close();
  };
}
