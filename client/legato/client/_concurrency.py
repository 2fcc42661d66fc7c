"""Where the two faces of the client really differ: how they wait, sleep, run
work beside each other and stop it. Everything else is written once, in `_async`.

`_async` uses the `Async…`/`async_…` names below; `scripts/unasync.py` turns them
into the plain names when it writes `_sync`, so each pair must keep one shape:

    asyncio (tasks)                   blocking (threads)
    AsyncEvent.wait(timeout) -> bool  Event.wait(timeout) -> bool   (threading.Event)
    async_sleep(seconds)              sleep(seconds)                (time.sleep)
    AsyncGuard: no lock needed        Guard: a threading.RLock
    async_spawn(fn, name)             spawn(fn, name): a daemon thread
    AsyncHandlerRun: cancels the      HandlerRun: a thread cannot be cancelled
        handler's task                    from outside; it is only told
    async_unary(...): cancellable     unary(...): cancellable through the call's future
    async_on_signals(stop)            on_signals(stop)
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator, Iterator
from typing import Any, Protocol, TypeAlias, TypeVar

import grpc

T = TypeVar("T")

# A generator of the face: `AsyncStream[X]` becomes `Stream[X]`.
AsyncStream: TypeAlias = AsyncGenerator[T, None]
Stream: TypeAlias = Generator[T, None, None]

# Signals that stop a worker gracefully where the worker runs in the main thread.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Cancellable(Protocol):
    """A call in flight that another task or thread can end (`grpc` calls and futures)."""

    def cancel(self) -> bool: ...


class CallCancelledError(Exception):
    """The call was ended by `cancel()` on its handle (a worker stopping), not by the daemon."""


class HandlerCancelledError(Exception):
    """The handler's asyncio task was cancelled (by the job's interruption, or by itself)."""


def _cancelling() -> bool:
    """Whether the running asyncio task is being cancelled from outside."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _unclaimed_signals() -> list[int]:
    # A program that handles a stop signal itself keeps its handler.
    return [
        signum
        for signum in STOP_SIGNALS
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)
    ]


# -- asyncio -----------------------------------------------------------------------------


class AsyncEvent:
    """An asyncio.Event whose `wait` takes a timeout and says whether it was set."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel
        # that arrives in the turn the event is set, and the canceled task runs on.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()
        return self._event.is_set()


async def async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class AsyncGuard:
    """Nothing to lock: asyncio switches tasks only at an await."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class AsyncSpawned:
    """Work running beside the caller as an asyncio task."""

    def __init__(self, task: asyncio.Task[None]):
        self._task = task

    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> None:
        if self._task is not asyncio.current_task():
            self._task.cancel()

    async def join(self, timeout: float | None = None) -> bool:
        """Waits for the work to end, at most `timeout` seconds; whether it did.

        asyncio.wait, not `await task` under suppress(CancelledError): that would
        also swallow a cancel aimed at the caller and carry on.
        """
        if self._task is asyncio.current_task():
            return False
        done, _ = await asyncio.wait([self._task], timeout=timeout)
        return bool(done)


def async_spawn(work: Callable[[], Coroutine[Any, Any, None]], name: str) -> AsyncSpawned:
    return AsyncSpawned(asyncio.create_task(work(), name=name))


class AsyncHandlerRun:
    """Runs a job's handler in a task of its own, so that the job's interruption
    can cancel it (as Temporal cancels an activity)."""

    def __init__(self) -> None:
        self._running: asyncio.Future[Any] | None = None

    async def run(self, handler: Callable[[Any], Awaitable[T]], job: Any) -> T:
        """The handler's result; HandlerCancelledError if its task was cancelled
        while the caller's was not (a caller being cancelled sees CancelledError)."""
        running = asyncio.ensure_future(handler(job))
        self._running = running
        try:
            result: T = await running
            return result
        except asyncio.CancelledError:
            if _cancelling():
                raise
            raise HandlerCancelledError from None
        finally:
            self._running = None

    def cancel(self) -> bool:
        """Cancels the running handler; whether there was one to cancel."""
        running = self._running
        if running is None or running.done() or running is asyncio.current_task():
            return False
        running.cancel()
        return True


async def async_unary(
    method: Callable[..., Any],
    request: Any,
    timeout: float | None,
    metadata: tuple[tuple[str, str], ...],
    on_call: Callable[[Cancellable], None] | None,
) -> Any:
    """One unary call; `on_call` gets its handle first, so that someone else can end it."""
    call = method(request, timeout=timeout, metadata=metadata)
    if on_call is not None:
        on_call(call)
    try:
        return await call
    except asyncio.CancelledError:
        if on_call is None or _cancelling():
            raise
        raise CallCancelledError from None


# The stops SIGTERM and SIGINT call, every worker's in the process (several may
# run in one program); the handlers are installed for the first, removed after the last.
_stops: list[Callable[[], None]] = []
# Undoes the installation while any stop is registered: the handlers belong to the
# set of workers, not to the first of them, which may end before the others.
_uninstall: list[Callable[[], None]] = []


def _stop_all(*_: object) -> None:
    for stop in list(_stops):
        stop()


@contextlib.contextmanager
def _registered(
    stop: Callable[[], None], install: Callable[[], Callable[[], None]]
) -> Iterator[None]:
    """Registers `stop` for the block; the first registration installs the signal
    handlers (`install` returns how to remove them), the last one out removes them."""
    if not _stops:
        _uninstall.append(install())
    _stops.append(stop)
    try:
        yield
    finally:
        _stops.remove(stop)
        if not _stops:
            _uninstall.pop()()


@contextlib.contextmanager
def async_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call `stop` while the block runs, where the loop runs in
    the main thread; elsewhere signals are left as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()

    def install() -> Callable[[], None]:
        installed = []
        for signum in _unclaimed_signals():
            try:
                loop.add_signal_handler(signum, _stop_all)
            except (NotImplementedError, RuntimeError):  # not on this platform or loop
                continue
            installed.append(signum)

        def uninstall() -> None:
            for signum in installed:
                loop.remove_signal_handler(signum)

        return uninstall

    with _registered(stop, install):
        yield


# -- blocking ----------------------------------------------------------------------------


Event = threading.Event
sleep = time.sleep
# Re-entrant: a signal handler (worker.stop) may run while its thread holds it.
Guard = threading.RLock


class Spawned:
    """Work running beside the caller in a daemon thread (it never holds up exit)."""

    def __init__(self, thread: threading.Thread):
        self._thread = thread

    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        """A thread cannot be cancelled: it stops when its stop event or call ends."""

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is threading.current_thread():
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


def spawn(work: Callable[[], None], name: str) -> Spawned:
    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    return Spawned(thread)


class HandlerRun:
    """Runs a job's handler in the calling thread. It cannot be cancelled from
    outside: an interrupted job tells the handler instead (`job.interrupted`,
    `job.wait_interrupted()`, `JobInterruptedError` from its calls)."""

    def run(self, handler: Callable[[Any], T], job: Any) -> T:
        return handler(job)

    def cancel(self) -> bool:
        return False


def unary(
    method: Any,
    request: Any,
    timeout: float | None,
    metadata: tuple[tuple[str, str], ...],
    on_call: Callable[[Cancellable], None] | None,
) -> Any:
    """One unary call; with `on_call`, made as a future that another thread can cancel."""
    if on_call is None:
        return method(request, timeout=timeout, metadata=metadata)
    future = method.future(request, timeout=timeout, metadata=metadata)
    on_call(future)
    try:
        return future.result()
    except grpc.FutureCancelledError:
        raise CallCancelledError from None


@contextlib.contextmanager
def on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call `stop` while the block runs, in the main thread;
    elsewhere signals are left as they are.

    The handler only puts the signal on a SimpleQueue (whose put is safe in a
    signal handler) and a thread of its own calls the stops: a stop takes locks,
    and a handler runs in the main thread between any two bytecodes, maybe while
    that thread holds one of them (setting an Event from the handler while the
    main thread clears it deadlocks).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def install() -> Callable[[], None]:
        previous = {signum: signal.getsignal(signum) for signum in _unclaimed_signals()}
        signals: queue.SimpleQueue[int | None] = queue.SimpleQueue()

        def relay_signals() -> None:
            while signals.get() is not None:
                _stop_all()

        relay = threading.Thread(target=relay_signals, name="legato stop signals", daemon=True)
        relay.start()
        for signum in previous:
            signal.signal(signum, lambda signum, frame: signals.put(signum))

        def uninstall() -> None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signals.put(None)
            relay.join()

        return uninstall

    with _registered(stop, install):
        yield
