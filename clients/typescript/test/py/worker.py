"""A Python worker for the cross-language tests: claims one task, streams two
chunks, completes it. Prints what it saw as JSON lines."""

import json
import os

from legato.client import Client

with Client() as worker:  # LEGATO_ADDRESS, LEGATO_AGENT_KEY
    job = worker.claim([os.environ["LABEL"]], lease=60, wait=10)
    assert job is not None, "nothing came to claim"
    context = job.task.context
    print(
        json.dumps(
            {
                "claimed": job.id,
                "context": context,
                "types": {k: type(v).__name__ for k, v in context.items()},
            }
        ),
        flush=True,
    )
    job.write("Tier 1 allows ")
    job.write("500 requests per minute.")
    job.complete(
        {
            "rpm": 500,
            "tpm": 30000,
            "source": "https://docs.example/limits",
            "verified_at": "2026-12-01T09:30:00Z",
        }
    )
    print(json.dumps({"completed": job.id}), flush=True)
