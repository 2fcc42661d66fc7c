"""Task ids and the client's idempotency keys begin with the time they were made,
so each index of them grows at its end rather than taking a random page of
itself on every create (BENCHMARKS.md, `python -m bench.ids`)."""

from __future__ import annotations

import base64
import time

from legato.client._core import new_idempotency_key
from legato.server.tasks import new_task_id

SORTED = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
STANDARD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def ms_of(task_id: str) -> int:
    body = task_id.removeprefix("t_").translate(str.maketrans(SORTED, STANDARD))
    return int.from_bytes(base64.urlsafe_b64decode(body)[:6], "big")


def test_a_task_id_begins_with_its_creation_time_and_sorts_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_task_id()
    after = time.time_ns() // 1_000_000
    assert first.startswith("t_") and len(first) == 26
    assert set(first[2:]) <= set(SORTED)
    assert before <= ms_of(first) <= after
    # Ids of a later millisecond sort after, whatever their random part.
    later = new_task_id()
    while ms_of(later) == ms_of(first):
        later = new_task_id()
    assert later > first
    assert len({new_task_id() for _ in range(10_000)}) == 10_000


def test_an_automatic_idempotency_key_begins_with_its_time() -> None:
    before = time.time_ns() // 1000
    key = new_idempotency_key()
    after = time.time_ns() // 1000
    assert key.startswith("auto-") and len(key) == 37
    assert before <= int(key[5:21], 16) <= after
    later = new_idempotency_key()
    while later[5:21] == key[5:21]:
        later = new_idempotency_key()
    assert later > key
    assert len({new_idempotency_key() for _ in range(10_000)}) == 10_000
