"""The blocking client is exactly what scripts/unasync.py writes from the asyncio one."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "unasync.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_blocking_client_is_the_generated_one() -> None:
    checked = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_swaps_turn_asyncio_code_into_blocking_code() -> None:
    unasync = load_script().unasync
    source = (
        "async def run(self, f: Callable[..., Awaitable[Mapping[str, Any] | None]]) -> None:\n"
        "    async with aclosing(self._watch()) as events:\n"
        "        async for event in events:\n"
        "            await async_sleep(1)\n"
        "    except grpc.aio.AioRpcError:\n"
        "    channel = grpc.aio.insecure_channel(address)\n"
        "    return AsyncClient, AsyncEvent(), await self.aclose()\n"
    )
    body = unasync(source).split("\n", 2)[2]  # after the two header lines
    assert body == (
        "def run(self, f: Callable[..., Mapping[str, Any] | None]) -> None:\n"
        "    with closing(self._watch()) as events:\n"
        "        for event in events:\n"
        "            sleep(1)\n"
        "    except grpc.RpcError:\n"
        "    channel = grpc.insecure_channel(address)\n"
        "    return Client, Event(), self.close()\n"
    )


def test_a_stale_blocking_client_fails_the_check(tmp_path: Path) -> None:
    script = load_script()
    stale = tmp_path / "_sync.py"
    stale.write_text("# edited by hand\n")
    setattr(script, "TARGET", stale)  # noqa: B010 (the module is loaded from a path)
    assert script.main(["--check"]) == 1
