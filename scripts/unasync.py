"""Writes the blocking face of the client from the asyncio one.

    python scripts/unasync.py           # regenerates client/legato/client/_sync.py
    python scripts/unasync.py --check   # exits 1 if _sync.py is not what it would write

`_async.py` is the one source of the client's behaviour; `_sync.py` is this
script's output and is never edited by hand. The rewrite is a list of token
swaps (`async def` -> `def`, `await x` -> `x`, `AsyncClient` -> `Client`, ...);
where the faces really differ, `_async.py` calls a hand-written piece of
`_concurrency.py` whose blocking twin has the plain name.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "client/legato/client/_async.py"
TARGET = ROOT / "client/legato/client/_sync.py"

HEADER = (
    "# Generated from _async.py by scripts/unasync.py (`make sync`); do not edit.\n"
    "# `make sync-check` fails when this file is not what the script writes.\n"
)

# In order; each pattern is a regular expression matched against the whole file.
SUBSTITUTIONS: list[tuple[str, str]] = [
    # Words in the module docstring and in prose that name the face.
    (r"\bThe asyncio face\b", "The blocking face"),
    (r"\bAn asyncio client\b", "A blocking client"),
    # Syntax.
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    # grpc's asyncio API and its blocking twin.
    (r"\bgrpc\.aio\.AioRpcError\b", "grpc.RpcError"),
    (r"\bgrpc\.aio\.", "grpc."),
    # The standard library's asynchronous names.
    (r"\baclosing\b", "closing"),
    (r"\basynccontextmanager\b", "contextmanager"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\baclose\b", "close"),
    # Our own: AsyncClient -> Client, AsyncEvent -> Event, async_sleep -> sleep ...
    (r"\bAsync([A-Z]\w*)", r"\1"),
    (r"\basync_([a-z]\w*)", r"\1"),
]


def _drop_awaitable(text: str) -> str:
    """`Awaitable[X]` -> `X`, for any X, brackets nested or not."""
    out: list[str] = []
    position = 0
    for match in re.finditer(r"\bAwaitable\[", text):
        if match.start() < position:
            continue  # inside an Awaitable already unwrapped
        depth, end = 1, match.end()
        while depth:
            depth += {"[": 1, "]": -1}.get(text[end], 0)
            end += 1
        out.append(text[position : match.start()])
        out.append(_drop_awaitable(text[match.end() : end - 1]))
        position = end
    out.append(text[position:])
    return "".join(out)


def unasync(source: str) -> str:
    text, _ = _unasync(source)
    return text


def _unasync(source: str) -> tuple[str, list[str]]:
    """The blocking text, and the patterns that matched nothing (stale rules)."""
    text = _drop_awaitable(source)
    unused = []
    for pattern, replacement in SUBSTITUTIONS:
        text, count = re.subn(pattern, replacement, text)
        if not count:
            unused.append(pattern)
    return HEADER + text, unused


def _ruff(*args: str, text: str) -> str:
    ruff = Path(sys.executable).with_name("ruff")
    command = [str(ruff), *args, "--stdin-filename", str(TARGET), "-"]
    return subprocess.run(
        command, input=text, capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout


def formatted(text: str) -> str:
    """The text as `ruff` leaves it: imports the swaps emptied (`Awaitable`) go,
    renamed ones are sorted again, lines that got shorter may join."""
    text = _ruff("check", "--fix-only", "--select", "F401,I001", "--quiet", text=text)
    return _ruff("format", "--quiet", text=text)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if _sync.py is stale")
    args = parser.parse_args(argv)
    text, unused = _unasync(SOURCE.read_text())
    if unused:
        # A rule nothing needs hides what the rewrite really does: drop it.
        print(f"unasync: these patterns match nothing in {_shown(SOURCE)}: {unused}")
        return 1
    expected = formatted(text)
    if not args.check:
        TARGET.write_text(expected)
        print(f"unasync: wrote {_shown(TARGET)}")
        return 0
    actual = TARGET.read_text() if TARGET.exists() else ""
    if actual == expected:
        print(f"sync-check: {_shown(TARGET)} matches {_shown(SOURCE)}")
        return 0
    diff = difflib.unified_diff(
        actual.splitlines(keepends=True),
        expected.splitlines(keepends=True),
        f"{_shown(TARGET)} (committed)",
        f"{_shown(TARGET)} (generated)",
    )
    sys.stdout.writelines(list(diff)[:60])
    print(f"sync-check: {_shown(TARGET)} is out of date; run 'make sync'")
    return 1


if __name__ == "__main__":
    sys.exit(main())
