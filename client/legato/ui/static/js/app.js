// The page: signs in, then shows the tasks list, a task, or the agents.
// Links between pages are handled here (no reload), so a page's stream is
// closed when another page opens.

import { signIn, useCsrf } from "./api.js";
import { h, clear } from "./dom.js";
import { useIndicator } from "./live.js";
import { mountTasks } from "./tasks.js";
import { mountTask } from "./task.js";
import { mountAgents } from "./agents.js";

const main = document.getElementById("main");
let unmount = () => {};
let session = null;

function route() {
  const path = location.pathname;
  const task = path.match(/^\/tasks\/([^/]+)$/);
  if (task) return (root) => mountTask(root, decodeURIComponent(task[1]), session);
  if (path === "/agents") return (root) => mountAgents(root, session);
  return (root) => mountTasks(root, session);
}

function render() {
  unmount();
  clear(main);
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    const here = link.dataset.page === (location.pathname === "/agents" ? "agents" : "tasks");
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  unmount = route()(main) ?? (() => {});
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[href]");
  if (!link || event.defaultPrevented || event.button !== 0) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith("/api/")) return;
  event.preventDefault();
  if (url.pathname + url.search !== location.pathname + location.search) {
    history.pushState(null, "", url.pathname + url.search);
  }
  render();
});
window.addEventListener("popstate", render);

async function start() {
  useIndicator(document.getElementById("live"));
  try {
    session = await signIn();
  } catch (error) {
    clear(main).append(h("p", { class: "error", role: "alert" }, `The UI cannot be reached: ${error.message}`));
    return;
  }
  if (!session) {
    clear(main).append(
      h("h1", {}, "Not signed in"),
      h("p", { class: "note" }, "Open the link `legato ui` printed when it started: it carries the token of this start."),
    );
    return;
  }
  useCsrf(session.csrf);
  const me = session.agent;
  document.getElementById("who").textContent = `as ${me.name} (${me.role})`;
  render();
}

start();
