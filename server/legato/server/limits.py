"""Input limits and syntax rules, checked before anything is written.

Each check raises `InvalidArgument` naming the field and what to change.
The numbers are part of the documented contract (see README).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from legato.server.errors import InvalidArgument
from legato.server.model import FIELD_OVERHEAD, TASK_OVERHEAD

MAX_CONTENT_BYTES = 64 * 1024
MAX_BLOB_BYTES = 1024 * 1024  # context and result, serialized
MAX_LABELS = 16
MAX_LABEL_BYTES = 64  # see LABEL_RE
MAX_NAME_BYTES = 63  # an agent's name (see agents.NAME_RE)
MAX_TEXT_BYTES = 8 * 1024  # error, cancel reason, question, answer
# The daemon may prefix a reason it passes on ("canceled with its ancestor
# task t_...: <reason>"), so a stored error can pass MAX_TEXT_BYTES by that much.
MAX_ERROR_BYTES = MAX_TEXT_BYTES + 256
# An attempt's output (UTF-8), which GetTask returns; `lifecycle` enforces it.
MAX_OUTPUT_BYTES = 1024 * 1024
MAX_IDEMPOTENCY_KEY = 128
MAX_WATCH_TASK_IDS = 1000
MAX_ID_LENGTH = 64
DEFAULT_MAX_ATTEMPTS = 3
MAX_MAX_ATTEMPTS = 100
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_LEASE_US = 5 * 60 * 1_000_000
MAX_LEASE_US = 24 * 3600 * 1_000_000

# The largest request or response gRPC carries (both ways, set on the server
# and the client).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# What a page of a listing may add up to: a page stops before it would pass
# it (always holding at least one item), so no listing outgrows a message.
PAGE_BUDGET_BYTES = 3 * 1024 * 1024

# The largest task any message carries, every field at its limit, framing
# included (`model.task_size` of such a task is at most this): GetTask adds the
# output to content, context and result; a CreateTask request also has the
# idempotency key. Its warnings (a line per label) ride on a task without a
# result or an output, a megabyte or more below this.
MAX_TASK_BYTES = (
    MAX_CONTENT_BYTES
    + 2 * MAX_BLOB_BYTES  # context, result
    + MAX_OUTPUT_BYTES
    + MAX_ERROR_BYTES
    + 2 * MAX_TEXT_BYTES  # question, answer
    + MAX_LABELS * MAX_LABEL_BYTES
    + 3 * MAX_ID_LENGTH  # id, parent_id, root_id
    + 2 * MAX_NAME_BYTES  # created_by, claimed_by
    + MAX_IDEMPOTENCY_KEY
    + (14 + MAX_LABELS) * FIELD_OVERHEAD
    + TASK_OVERHEAD
)

# So no single task, however large, can outgrow a message: a page holds at
# least one item even when that item alone passes PAGE_BUDGET_BYTES.
assert MAX_TASK_BYTES < MAX_MESSAGE_BYTES, (MAX_TASK_BYTES, MAX_MESSAGE_BYTES)
# A page of several items stays under the budget, plus the response's own
# fields (a page token, a cursor).
assert PAGE_BUDGET_BYTES + 1024 < MAX_MESSAGE_BYTES

LABEL_RE = re.compile(r"@[a-z0-9][a-z0-9._-]{0,62}")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_text(field: str, text: str, limit: int, *, required: bool = False) -> str:
    if required and not text.strip():
        raise InvalidArgument(f"{field} is required and must not be blank")
    size = _utf8_len(text)
    if size > limit:
        raise InvalidArgument(f"{field} is {size} bytes; the limit is {limit} bytes")
    return text


def check_label(field: str, label: str) -> str:
    if not LABEL_RE.fullmatch(label):
        raise InvalidArgument(
            f"{field}: {label[:80]!r} is not a label; labels are '@' followed by 1 to 63 of "
            "a-z, 0-9, '.', '_' or '-', starting with a letter or digit (e.g. '@researcher')"
        )
    return label


def check_labels(field: str, labels: Sequence[str], *, required: bool) -> tuple[str, ...]:
    if required and not labels:
        raise InvalidArgument(f"{field} is required: give at least one label, e.g. '@researcher'")
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{field} has {len(labels)} labels; the limit is {MAX_LABELS}")
    checked = [check_label(field, label) for label in labels]
    return tuple(dict.fromkeys(checked))  # drop repeats, keep order


def check_blob(field: str, blob: bytes) -> bytes:
    if len(blob) > MAX_BLOB_BYTES:
        raise InvalidArgument(
            f"{field} is {len(blob)} bytes serialized; the limit is {MAX_BLOB_BYTES} bytes"
        )
    return blob


def check_id(field: str, value: str, *, required: bool = True) -> str:
    if required and not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise InvalidArgument(f"{field} {value[:80]!r} is not a task id")
    return value


def check_lease(field: str, lease_us: int | None) -> int | None:
    if lease_us is None:
        return None
    if lease_us <= 0 or lease_us > MAX_LEASE_US:
        raise InvalidArgument(
            f"{field} must be more than 0 and at most 24 hours; got {lease_us / 1e6:g} s"
        )
    return lease_us


def check_max_attempts(value: int) -> int:
    if value == 0:
        return DEFAULT_MAX_ATTEMPTS
    if not 1 <= value <= MAX_MAX_ATTEMPTS:
        raise InvalidArgument(
            f"max_attempts must be 1 to {MAX_MAX_ATTEMPTS} (0 means 3); got {value}"
        )
    return value


def check_page_size(value: int) -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be 1 to {MAX_PAGE_SIZE} (0 means 100); got {value}")
    return value
