"""A Python coder for the cross-language tests: delegates one task, follows
its output, waits for the result. Prints what it saw as JSON lines."""

import json
import os

from legato.client import Client

with Client() as coder:  # LEGATO_ADDRESS, LEGATO_AGENT_KEY
    handle = coder.delegate(
        os.environ["LABEL"],
        "What is the current rate limit for Tier 1?",
        context={"urgency": "high", "blocking": True, "check_date": "2026-12-01", "retries": 3},
    )
    print(json.dumps({"created": handle.id}), flush=True)
    output = "".join(handle.output(timeout=10))
    task = handle.result(timeout=10)
    result = task.result or {}
    print(
        json.dumps(
            {
                "status": str(task.status),
                "result": result,
                "types": {k: type(v).__name__ for k, v in result.items()},
                "output": output,
            }
        ),
        flush=True,
    )
