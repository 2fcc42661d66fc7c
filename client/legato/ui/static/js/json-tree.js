// A JSON value as a tree people can read: objects and arrays fold, leaves are typed.

import { h } from "./dom.js";

const OPEN_DEPTH = 2;

function leaf(value) {
  if (value === null) return h("span", { class: "json-null" }, "null");
  if (typeof value === "string") return h("span", { class: "json-string" }, JSON.stringify(value));
  if (typeof value === "number") return h("span", { class: "json-number" }, String(value));
  if (typeof value === "boolean") return h("span", { class: "json-bool" }, String(value));
  return h("span", {}, String(value));
}

function node(key, value, depth) {
  const name = key === null ? null : h("span", { class: "json-key" }, `${key}: `);
  if (value === null || typeof value !== "object") return h("li", {}, name, leaf(value));
  const entries = Array.isArray(value) ? value.map((v, n) => [n, v]) : Object.entries(value);
  const shape = Array.isArray(value) ? `[${entries.length}]` : `{${entries.length}}`;
  if (!entries.length) return h("li", {}, name, h("span", { class: "json-empty" }, Array.isArray(value) ? "[]" : "{}"));
  return h(
    "li",
    {},
    h(
      "details",
      { open: depth < OPEN_DEPTH },
      h("summary", {}, name, h("span", { class: "json-shape" }, shape)),
      h("ul", {}, entries.map(([k, v]) => node(k, v, depth + 1))),
    ),
  );
}

/** `value` as a nested list; `label` names it for assistive technology. */
export function jsonTree(value, label) {
  return h("ul", { class: "json-tree", "aria-label": label }, node(null, value, 0));
}
