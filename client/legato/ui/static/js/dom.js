// Small DOM helpers: building elements, and times as people read them.

/**
 * An element: h("a", {href: "/", class: "x"}, "text", child, ...).
 * Attributes starting with "on" are listeners; `null`/`false` ones are left out.
 */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

/** "12 s", "4 min", "3 h", "2 d" since an ISO time. */
export function age(iso, now = Date.now()) {
  const seconds = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h`;
  return `${Math.floor(seconds / 86400)} d`;
}

/** A local date and time, to the millisecond. */
export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  const day = `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  const time = `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  return `${day} ${time}.${pad(date.getMilliseconds(), 3)}`;
}

export const TERMINAL = new Set(["done", "failed", "canceled"]);

export function statusBadge(status) {
  return h("span", { class: `status status-${status}` }, status.replace("_", " "));
}

/** The first line of a request, as the list shows it. */
export function titleOf(task) {
  return task.title || "(empty request)";
}
