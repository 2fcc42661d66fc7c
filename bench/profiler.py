"""Where a server's time goes under load: py-spy recordings of a running process, summarised.

Three recordings of the same length are taken one after the other while the
load runs, each `py-spy record --pid PID --rate R --format raw --threads
--nolineno --full-filenames` plus:

- `--idle`: every thread at every tick, waiting or not; the main thread's
  count is the number of ticks (the denominator of every share below), and
  the thread names;
- `--gil`: only the thread holding the GIL at each tick: the share of wall
  time the GIL was held, and by what Python code. A process whose GIL is held
  most of the time cannot go faster by adding threads, only by doing less
  Python. Time in extension code (grpc's Cython core, uvloop, protobuf's upb)
  shows as the innermost Python frame that called it: the event loop's
  `run_forever` for everything grpc and uvloop do between callbacks;
- `--gil --native`: the same with native frames, which splits that time
  between grpc's core, system calls, uvloop, protobuf and the interpreter
  (grpc's own symbols are stripped: its frames are only an address).

py-spy's own view of which threads are on a CPU proved unreliable here
(waiting threads counted as running), so CPU per thread comes from
/proc/PID/task/TID/stat over the whole window instead (`thread_cpu`).

A frame's self time is the samples whose innermost frame it is.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import BIN

RATE = 200
MODES = {"idle": ["--idle"], "gil": ["--gil"], "native": ["--gil", "--native"]}
# Where a frame's file lives, by path fragment, first match wins: Python files...
PACKAGES = [
    ("legato/server/", "legato server"),
    ("/bench/", "bench harness"),
    ("/grpc/", "grpc"),
    ("/grpc_", "grpc"),
    ("/google/protobuf/", "protobuf"),
    ("/uvloop/", "uvloop"),
    ("/asyncio/", "asyncio"),
    ("/lib/python3", "stdlib"),
]
# ...and native frames (--native): `function (library or C source file)`.
NATIVE = [
    ("cygrpc", "grpc core (native)"),
    ("libc.so", "libc: system calls"),
    ("loop.c", "uvloop (native)"),
    ("uvloop", "uvloop (native)"),
    ("_message", "protobuf (native)"),
    ("upb", "protobuf (native)"),
    ("sqlite", "sqlite (native)"),
]


def py_spy() -> Path | None:
    """The py-spy executable (installed by `make bench` into the venv), if any."""
    local = BIN / "py-spy"
    if local.exists():
        return local
    found = shutil.which("py-spy")
    return Path(found) if found else None


@dataclass(frozen=True)
class Stack:
    thread: str
    tid: int
    frames: tuple[str, ...]  # outermost first, each `function (file)`
    count: int


def parse_raw(text: str, pid: int) -> list[Stack]:
    """py-spy's raw (collapsed) format with --threads: `thread (TID[): NAME]);f;g COUNT`."""
    stacks = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        path, _, count = line.rpartition(" ")
        parts = path.split(";")
        head, thread, tid = parts[0], parts[0], 0
        if head.startswith("thread ("):
            number, _, name = head[len("thread (") :].partition(")")
            tid = int(number, 0)
            name = name.lstrip(":").strip()
            thread = name or ("MainThread" if tid == pid else f"thread {tid}")
        stacks.append(Stack(thread, tid, tuple(parts[1:]), int(count)))
    return stacks


def frame_file(frame: str) -> str:
    return frame[frame.rfind("(") + 1 : -1] if frame.endswith(")") else ""


def package_of(frame: str) -> str:
    file = frame_file(frame)
    if not file:
        return "(no frame)"
    python = file.endswith(".py") or file.startswith("<")
    for fragment, name in PACKAGES if python else NATIVE:
        if fragment in file:
            return name
    return "other" if python else "python interpreter and other native code"


def short(frame: str) -> str:
    """`function (file)` with the file cut to what tells it apart."""
    file = frame_file(frame)
    function = frame[: frame.rfind(" (")] if file else frame
    if "legato/server/" in file:
        shown = "legato/server/" + file.split("legato/server/", 1)[1]
    elif "/site-packages/" in file:
        shown = file.split("/site-packages/", 1)[1]
    elif "/lib/python3" in file:
        shown = file.split("/lib/", 1)[1].split("/", 1)[1]
    else:
        shown = "/".join(file.split("/")[-2:])
    return f"{function} ({shown})"


def _self(stacks: Iterable[Stack]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for stack in stacks:
        counts[stack.frames[-1] if stack.frames else "(thread only)"] += stack.count
    return counts


def _inclusive(stacks: Iterable[Stack], keep: str) -> Counter[str]:
    """Samples whose stack holds a frame of package `keep`, per such frame (once per stack)."""
    counts: Counter[str] = Counter()
    for stack in stacks:
        for frame in set(stack.frames):
            if package_of(frame) == keep:
                counts[frame] += stack.count
    return counts


def _own_self(stacks: Iterable[Stack], keep: str) -> Counter[str]:
    """Per frame of package `keep`: samples where it is the innermost frame of that package
    (its own code, and whatever it called outside that package)."""
    counts: Counter[str] = Counter()
    for stack in stacks:
        for frame in reversed(stack.frames):
            if package_of(frame) == keep:
                counts[frame] += stack.count
                break
    return counts


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (utime + stime) of each thread of `pid` so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def summarise(
    recordings: dict[str, list[Stack]], cpu_shares: dict[int, float], top: int = 12
) -> dict[str, Any]:
    """Shares of wall time (ticks) by thread, package and frame; JSON-ready.

    `cpu_shares`: each thread's CPU seconds per second of wall time, by tid.
    """
    idle = recordings["idle"]
    by_thread_idle = Counter[str]()
    names: dict[int, str] = {}
    for stack in idle:
        by_thread_idle[stack.thread] += stack.count
        names[stack.tid] = stack.thread
    ticks = by_thread_idle.get("MainThread") or max(by_thread_idle.values(), default=0)
    if not ticks:
        return {"ticks": 0}

    def shares(counts: Counter[str], n: int | None = None) -> list[tuple[str, float]]:
        return [(short(k) if " (" in k else k, v / ticks) for k, v in counts.most_common(n)]

    cpu: dict[str, float] = {}
    for tid, share in cpu_shares.items():
        name = names.get(tid, "threads without Python frames")
        cpu[name] = cpu.get(name, 0.0) + share
    summary: dict[str, Any] = {
        "ticks": ticks,
        "rate": RATE,
        "cpu_threads": sorted(cpu.items(), key=lambda item: -item[1]),
        "cpu_total": sum(cpu_shares.values()),
    }
    for mode in ("gil", "native"):
        stacks = recordings[mode]
        threads: Counter[str] = Counter()
        packages: Counter[str] = Counter()
        for stack in stacks:
            threads[stack.thread] += stack.count
            packages[package_of(stack.frames[-1]) if stack.frames else "(no frame)"] += stack.count
        summary[mode] = {
            "total": sum(threads.values()) / ticks,
            "threads": shares(threads),
            "packages": shares(packages),
            "self": shares(_self(stacks), top),
            "legato_self": shares(_own_self(stacks, "legato server"), top),
            "legato_inclusive": shares(_inclusive(stacks, "legato server"), top),
        }
    return summary


async def record(pid: int, mode: str, seconds: int, output: Path, rate: int = RATE) -> list[Stack]:
    """One py-spy recording of `pid` (py-spy takes whole seconds); raises RuntimeError
    with py-spy's words if it fails."""
    executable = py_spy()
    if executable is None:
        raise RuntimeError("py-spy is not installed (make bench installs it)")
    argv = [
        str(executable),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(rate),
        "--duration",
        str(seconds),
        "--format",
        "raw",
        "--output",
        str(output),
        "--threads",
        "--nolineno",
        "--full-filenames",
        *MODES[mode],
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), seconds + 30)
    if process.returncode != 0:
        said = (err or out).decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"py-spy {mode} failed: {said[0] if said else process.returncode}")
    # Read after the recording, between measurements: a blocking read is harmless here.
    return parse_raw(output.read_text(), pid)  # noqa: ASYNC240
