"""README.md's Python blocks run as written, against a real `legato serve`, so the docs cannot rot.

How this test reads the README, for whoever edits it:

- Every ```python block is a whole program, and its first line is a comment naming its
  file: `# coder.py`. The name up to its first `_` or `.` is the agent it runs as: the test
  runs it with that agent's key in LEGATO_AGENT_KEY, as the README tells the reader to
  (`coder_watch.py` runs as `coder`).
- `# NAME.py (runs until stopped)` marks a program that does not end by itself (a worker, a
  watch). It starts before the others of its section, and once they have exited and its own
  expected output (below) has appeared, it gets SIGTERM. Such a program does not catch
  SIGTERM: it must die of it, with nothing on stderr. Every other program must exit 0 with
  nothing on stderr.
- The blocks under one heading are one scene: its until-stopped programs start first, then
  the others all at once, side by side as in separate terminals. Scenes run one after
  another, in README order, on one daemon.
- The agents are those the README's ```sh blocks create on the local daemon: each
  `legato agent add ...` line there without `--address` (which would aim at another daemon,
  e.g. over TLS) runs through the CLI, and the key it prints is that agent's.
- EXPECTED says what a program's output must show.
- The blocks are also held to `make lint`: ruff and mypy --strict, as the code is.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legato.client import AsyncClient, TaskStatus

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LEGATO = Path(sys.executable).with_name("legato")
UNTIL_STOPPED = "(runs until stopped)"
# The longest any one step (a start, a program's run, an awaited line) may take.
GUARD = 15.0

RESULT = {"rpm": 500, "source": "https://docs.example/limits"}
# Per program, lines its stdout must show in this order: a str is a regular expression the
# whole line matches; a dict is a printed dict (key order is not part of it).
Line = str | dict[str, Any]
EXPECTED: dict[str, list[Line]] = {
    "coder.py": [RESULT],
    "coder_watch.py": [
        r"\d+ created t_\S+ pending",
        r"\d+ claimed t_\S+ claimed",
        r"\d+ completed t_\S+ done",
    ],
    "coder_follow.py": [r"Looking at the pricing docs\.\.\.", {"tier": "Tier 1", **RESULT}],
}


@dataclass(frozen=True)
class Block:
    """One ```python block of the README, and the heading it is under."""

    file: str
    agent: str
    until_stopped: bool
    code: str
    heading: str


def fenced(text: str) -> list[tuple[str, str, str]]:
    """Each fenced block of a markdown text as (language, body, the heading it is under)."""
    blocks: list[tuple[str, str, str]] = []
    heading = ""
    language: str | None = None  # inside a fence: its language
    body: list[str] = []
    for line in text.splitlines():
        if language is None:
            if line.startswith("```"):
                language, body = line[3:].strip(), []
            elif re.match(r"#+ ", line):
                heading = line
        elif line.startswith("```"):
            blocks.append((language, "\n".join(body) + "\n", heading))
            language = None
        else:
            body.append(line)
    assert language is None, f"a ``` fence under {heading!r} is never closed"
    return blocks


def python_blocks(text: str) -> list[Block]:
    blocks = []
    for language, code, heading in fenced(text):
        if language != "python":
            continue
        first = code.partition("\n")[0]
        named = re.fullmatch(r"# (\w[\w.-]*\.py)( \(runs until stopped\))?", first)
        assert named, (
            f"a python block under {heading!r} starts with {first!r}, not with the name of its "
            f"file (`# coder.py`, or `# worker.py {UNTIL_STOPPED}`): see this test's docstring"
        )
        file = named[1]
        agent = re.split(r"[_.]", file)[0]
        blocks.append(Block(file, agent, named[2] is not None, code, heading))
    return blocks


def agent_commands(text: str) -> list[list[str]]:
    """The README's `legato agent add ...` commands for the local daemon, as argv lists."""
    commands = [
        shlex.split(line, comments=True)
        for language, body, _ in fenced(text)
        if language == "sh"
        for line in body.splitlines()
        if line.startswith("legato agent add ")
    ]
    return [argv for argv in commands if "--address" not in argv]


def shows(lines: Sequence[str], expected: Sequence[Line]) -> bool:
    """Whether `lines` hold the `expected` ones, in order (others may come between)."""
    wanted = iter(expected)
    want = next(wanted, None)
    for line in lines:
        if want is not None and _matches(line, want):
            want = next(wanted, None)
    return want is None


def _matches(line: str, want: Line) -> bool:
    if isinstance(want, str):
        return re.fullmatch(want, line) is not None
    try:
        return bool(ast.literal_eval(line) == want)
    except (ValueError, SyntaxError):
        return False


@dataclass
class Program:
    """A README block running as its own process; its output is read as it comes."""

    block: Block
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    errors: bytearray = field(default_factory=bytearray)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)
    _reading: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, block: Block, folder: Path, env: Mapping[str, str]) -> Program:
        path = folder / block.file
        path.write_text(block.code)
        # -u: printed lines reach the test as they are printed, as they reach a terminal.
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-u",
            str(path),
            cwd=folder,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        program = cls(block, process)
        program._reading = asyncio.create_task(program._read())
        return program

    async def _read(self) -> None:
        stdout, stderr = self.process.stdout, self.process.stderr
        assert stdout is not None and stderr is not None

        async def lines() -> None:
            async for line in stdout:
                self.lines.append(line.decode().rstrip("\n"))
                self._progress.set()

        async def errors() -> None:
            while chunk := await stderr.read(65536):
                self.errors.extend(chunk)

        try:
            await asyncio.gather(lines(), errors())
        finally:
            self._progress.set()

    @property
    def stderr(self) -> str:
        return self.errors.decode(errors="replace")

    async def shown(self, expected: Sequence[Line]) -> None:
        """Returns once the output shows `expected`; fails if it ends or stalls before."""
        assert self._reading is not None
        while not shows(self.lines, expected):
            assert not self._reading.done(), f"{self.block.file} ended before showing {expected}"
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), GUARD)
            except TimeoutError:
                raise AssertionError(
                    f"{self.block.file} showed no {expected} in {GUARD} s"
                ) from None

    async def ended(self) -> int:
        """The exit status, once the process has exited and all its output is read."""
        assert self._reading is not None
        try:
            status = await asyncio.wait_for(self.process.wait(), GUARD)
            await asyncio.wait_for(self._reading, GUARD)
        except TimeoutError:
            raise AssertionError(f"{self.block.file} still runs after {GUARD} s") from None
        return status

    async def stop(self) -> None:
        """Kills the process if it still runs (the test failed), and reaps it."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        if self._reading is not None:
            await self._reading

    def __str__(self) -> str:
        return (
            f"--- {self.block.file} stdout:\n" + "\n".join(self.lines) + "\n"
            f"--- {self.block.file} stderr:\n{self.stderr}"
        )


async def play(
    scene: Sequence[Block], folder: Path, agent_env: Mapping[str, Mapping[str, str]]
) -> None:
    """Runs one heading's blocks: until-stopped ones first, then the rest side by side.

    `agent_env` is the environment each agent's programs run in.
    """
    started: list[Program] = []
    try:
        for block in sorted(scene, key=lambda block: not block.until_stopped):
            started.append(await Program.start(block, folder, agent_env[block.agent]))
        background = [p for p in started if p.block.until_stopped]
        foreground = [p for p in started if not p.block.until_stopped]

        async def ran(program: Program) -> tuple[Program, int]:
            return program, await program.ended()

        # In the order they end: one that fails is reported at once, not after the others.
        for next_one in asyncio.as_completed([ran(program) for program in foreground]):
            program, status = await next_one
            assert status == 0, f"{program.block.file} exited {status}"
            assert program.stderr == "", f"{program.block.file} wrote to stderr"
            expected = EXPECTED.get(program.block.file, [])
            assert shows(program.lines, expected), f"{program.block.file} showed no {expected}"

        for program in background:
            await program.shown(EXPECTED.get(program.block.file, []))
            assert program.process.returncode is None, f"{program.block.file} ended by itself"
            program.process.send_signal(signal.SIGTERM)
            status = await program.ended()
            # run_worker stops gracefully on SIGTERM (hands back what it holds, returns).
            stopped = 0 if "run_worker(" in program.block.code else -signal.SIGTERM
            assert status == stopped, f"{program.block.file} ended {status} on SIGTERM"
            assert program.stderr == "", f"{program.block.file} wrote to stderr"
    except AssertionError as failure:
        for program in started:
            await program.stop()  # so that their output is complete
        outputs = "\n".join(str(program) for program in started)
        reason = str(failure).partition("\n")[0]  # without pytest's explanation of the assert
        raise AssertionError(f"{reason} (under {scene[0].heading!r})\n{outputs}") from None
    finally:
        for program in started:
            await program.stop()


async def test_every_python_block_of_the_readme_runs_as_written(short_tmp: Path) -> None:
    readme = README.read_text()
    blocks = python_blocks(readme)
    assert blocks, "README.md has no ```python block: nothing would be checked"
    files = [block.file for block in blocks]
    assert len(set(files)) == len(files), f"two blocks name the same file: {files}"
    assert set(EXPECTED) <= set(files), f"EXPECTED names no block: {set(EXPECTED) - set(files)}"

    data_dir, socket = short_tmp / "data", short_tmp / "run" / "legato.sock"
    # The reader's daemon is on the default socket and data dir; these stand in for them.
    base = {name: value for name, value in os.environ.items() if not name.startswith("LEGATO_")}
    base |= {
        "PATH": f"{LEGATO.parent}{os.pathsep}{base.get('PATH', '')}",
        "LEGATO_ADDRESS": f"unix:{socket}",
        "LEGATO_DATA_DIR": str(data_dir),
    }
    daemon_log = short_tmp / "daemon.log"
    with daemon_log.open("wb") as log:
        daemon = await asyncio.create_subprocess_exec(
            str(LEGATO),
            "serve",
            *("--data-dir", str(data_dir), "--listen", f"unix:{socket}", "--grace", "2"),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=base,
        )
    try:
        assert daemon.stdout is not None
        ready = (await asyncio.wait_for(daemon.stdout.readline(), GUARD)).decode()
        assert ready.startswith("legato serving on"), f"{ready!r}\n{daemon_log.read_text()}"

        keys = await add_agents(agent_commands(readme), base)
        for block in blocks:
            assert block.agent in keys, (
                f"{block.file} runs as agent {block.agent!r}, which no `legato agent add` "
                "in the README's sh blocks creates"
            )
        agent_env = {agent: {**base, "LEGATO_AGENT_KEY": key} for agent, key in keys.items()}
        folder = short_tmp / "programs"
        folder.mkdir()
        headings = list(dict.fromkeys(block.heading for block in blocks))
        for heading in headings:
            await play([block for block in blocks if block.heading == heading], folder, agent_env)

        # The workers died of SIGTERM with nothing in hand: every task is finished.
        admin_key = (data_dir / "admin.key").read_text().strip()
        async with AsyncClient(f"unix:{socket}", api_key=admin_key) as admin:
            tasks = (await admin.list_tasks()).tasks
        assert tasks, "the README's programs created no task"
        assert {task.status for task in tasks} == {TaskStatus.DONE}, tasks

        daemon.send_signal(signal.SIGTERM)
        await asyncio.wait_for(daemon.communicate(), GUARD)
        assert daemon.returncode == 0, daemon_log.read_text()
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()


async def add_agents(commands: Sequence[list[str]], env: Mapping[str, str]) -> dict[str, str]:
    """Runs the README's `legato agent add` commands; each agent's name and the key it printed."""
    assert commands, "the README's sh blocks create no agent with `legato agent add`"

    async def add(argv: list[str]) -> tuple[str, str]:
        process = await asyncio.create_subprocess_exec(
            str(LEGATO),
            *argv[1:],
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), GUARD)
        assert process.returncode == 0, f"{shlex.join(argv)}: {stderr.decode()}"
        key = re.search(r"export LEGATO_AGENT_KEY=(\S+)", stdout.decode())
        assert key, f"{shlex.join(argv)} printed no `export LEGATO_AGENT_KEY=...`"
        return argv[3], key[1]

    return dict(await asyncio.gather(*(add(argv) for argv in commands)))


def test_every_python_block_of_the_readme_passes_lint(short_tmp: Path) -> None:
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block: nothing would be checked"
    for block in blocks:
        (short_tmp / block.file).write_text(block.code)
    files = [str(short_tmp / block.file) for block in blocks]
    config = str(ROOT / "pyproject.toml")
    ruff = str(Path(sys.executable).with_name("ruff"))
    for command in (
        [ruff, "check", "--no-cache", "--config", config, *files],
        [ruff, "format", "--check", "--no-cache", "--config", config, *files],
        [sys.executable, "-m", "mypy", "--config-file", config, *files],
    ):
        ran = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stdout + ran.stderr
