"""The web UI's figures, measured in a real browser: `python -m bench.ui`.

- create → row: `CreateTask` returns, the daemon streams the event, `legato ui`
  passes it on over SSE, the page folds it in and the row is painted; timed
  from before the call (Python's wall clock) to the first animation frame
  after the row entered the DOM (the page's wall clock, same machine).
- a label never seen before: the same, for tasks each on a label no agent
  holds and no task had (`--new-labels` of them).
- 1,000 tasks: a fresh load of the list, from navigation start to every row in
  the DOM (the page's `tasks-rendered` mark).
- idle: CPU of the `legato ui` process, from /proc, while a page stays open
  and nothing happens.

Prints the figures; the targets are p99 well under a second, the list under
1 s, idle under 1% of a core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from legato.client import Client

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Records, for each row added to the list, the wall-clock time of the next frame.
WATCH_ROWS = """() => {
  window.rowPainted = {};
  new MutationObserver((changes) => {
    for (const change of changes) for (const node of change.addedNodes) {
      if (node.dataset && node.dataset.taskId) {
        const id = node.dataset.taskId;
        requestAnimationFrame(() => {
          window.rowPainted[id] = performance.timeOrigin + performance.now();
        });
      }
    }
  }).observe(document.querySelector("table.tasks tbody"), { childList: true });
}"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def start(argv: list[str], env: dict[str, str], log: Path, ready: str) -> tuple[Any, str]:
    with log.open("a") as err:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(ready):
        process.kill()
        raise SystemExit(f"{argv[1]} did not start: {line!r}; see {log}")
    return process, line.strip()


def stop(process: Any) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)


def measure(
    creates: int, new_labels: int, listed: int, idle_seconds: float, scratch: Path
) -> dict[str, float]:
    from playwright.sync_api import expect, sync_playwright

    data, socket = scratch / "data", scratch / "run" / "legato.sock"
    env = {**os.environ, "LEGATO_DATA_DIR": str(data)}
    env.pop("LEGATO_AGENT_KEY", None)
    daemon, _ = start(
        [
            *(str(BIN / "legato"), "serve", "--data-dir", str(data), "--listen", f"unix:{socket}"),
            *("--log-level", "warning", "--max-open-tasks", str(10 * (creates + listed))),
        ],
        env,
        scratch / "daemon.log",
        "legato serving on",
    )
    ui, line = start(
        [str(BIN / "legato"), "ui", "--address", f"unix:{socket}", "--listen", "127.0.0.1:0"],
        env,
        scratch / "ui.log",
        "legato ui on ",
    )
    link = line.removeprefix("legato ui on ")
    figures: dict[str, float] = {}
    try:
        with (
            Client(f"unix:{socket}", api_key=(data / "admin.key").read_text().strip()) as admin,
            sync_playwright() as playwright,
        ):
            admin.create_agent("bench", labels=["@bench"])
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(link)
            expect(page.get_by_role("status").filter(has_text="live")).to_be_visible(timeout=10_000)
            page.evaluate(WATCH_ROWS)

            def probe(content: str, label: str) -> float:
                before = time.time() * 1000
                task_id = admin.create_task(content, labels=[label]).id
                page.wait_for_function("(id) => window.rowPainted[id]", arg=task_id)
                painted: float = page.evaluate("(id) => window.rowPainted[id]", task_id)
                return painted - before

            latencies = [probe(f"latency probe {n}", "@bench") for n in range(creates)]
            figures["create → row p50 (ms)"] = statistics.median(latencies)
            figures["create → row p99 (ms)"] = percentile(latencies, 0.99)
            figures["create → row max (ms)"] = max(latencies)
            # A label no agent holds and no task had: the page's watch of the whole
            # view brings it as it brings any other.
            novel = [probe(f"a new label {n}", f"@new-{n}") for n in range(new_labels)]
            figures["create → row, a label never seen before, p50 (ms)"] = statistics.median(novel)
            figures["create → row, a label never seen before, max (ms)"] = max(novel)

            for n in range(listed - creates - new_labels):
                admin.create_task(f"listed task {n}\nwith a second line", labels=["@bench"])
            page.reload()
            page.wait_for_function(
                "() => performance.getEntriesByName('tasks-rendered', 'mark').length",
                timeout=30_000,
            )
            mark = page.evaluate(
                "() => { const m = performance.getEntriesByName('tasks-rendered', 'mark')[0];"
                " return {at: m.startTime, ...m.detail}; }"
            )
            figures[f"list of {mark['rows']} tasks: navigation → rendered (ms)"] = mark["at"]
            figures[f"list of {mark['rows']} tasks: fetch + render (ms)"] = mark["fetchAndRenderMs"]

            expect(page.get_by_role("status").filter(has_text="live")).to_be_visible(timeout=10_000)
            busy = cpu_seconds(ui.pid)
            time.sleep(idle_seconds)  # the measurement window itself
            idle = cpu_seconds(ui.pid) - busy
            figures[f"legato ui idle, a page open, {idle_seconds:g} s (% of a core)"] = (
                100 * idle / idle_seconds
            )
            browser.close()
    finally:
        stop(ui)
        stop(daemon)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--creates", type=int, default=200, help="latency probes (default 200)")
    parser.add_argument(
        "--new-labels", type=int, default=20, help="probes on new labels (default 20)"
    )
    parser.add_argument("--listed", type=int, default=1000, help="tasks in the list (default 1000)")
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, s (default 20)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lg-bench-ui-"))
    try:
        listed = max(args.listed, args.creates + args.new_labels)
        figures = measure(args.creates, args.new_labels, listed, args.idle, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"{name:<{width}}  {value:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
