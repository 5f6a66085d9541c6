"""A claimer process for the backend contract suite: ``python -m tests.contract_claimer KIND ADDRESS SLOTS``.

It registers a worker, claims until the queue is empty (up to SLOTS at a time), finishes each claimed task
at once as completed (result: the claimer's pid), and prints every task id it claimed, one per line.
"""

from __future__ import annotations

import os
import sys
import time

from cc_tasks.states import TaskStatus
from tests.backends import open_backend, worker_info


def main() -> int:
    kind, address, slots = sys.argv[1], sys.argv[2], int(sys.argv[3])
    backend = open_backend(kind, address)
    me = worker_info()
    backend.register(me)
    empty_since = None
    try:
        while True:
            claimed = backend.claim(me, slots)
            for r in claimed:
                print(r.task_id, flush=True)
                backend.finish(r.lease, TaskStatus.COMPLETED, result_text=str(os.getpid()))
            if claimed:
                empty_since = None
                continue
            if not backend.has_active():
                return 0
            empty_since = empty_since or time.monotonic()
            if time.monotonic() - empty_since > 30:
                return 1
            time.sleep(0.005)  # (others hold the rest: a claimer polls, it has nothing to wait on)
    finally:
        backend.unregister(me.worker_id)


if __name__ == "__main__":
    sys.exit(main())
