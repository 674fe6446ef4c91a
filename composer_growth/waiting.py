"""A barrier for after work that one rank does alone (an HF export, a dataset build).

``dist.barrier()`` there is a collective with the run's ``dist_timeout`` (300 s by default): if the
rank-0 work outlasts it, the waiting ranks' barrier times out and, on CUDA, NCCL's watchdog ends the
job. :func:`wait_for_all` instead meets the other ranks through the job's key-value store (the
TCPStore every rank joined at start), polling without a timeout: no collective is in flight while
one rank works. If a rank dies meanwhile the launcher ends the others.
"""

from __future__ import annotations

import itertools
import time

__all__ = ["wait_for_all"]

_calls = itertools.count()  # every rank calls wait_for_all in the same order: the n-th call meets the n-th
POLL_SECONDS = 0.2


def wait_for_all() -> None:
    """Wait until every rank has reached this call, however long that takes (no collective timeout)."""
    import torch.distributed as tdist
    from composer.utils import dist

    if dist.get_world_size() == 1 or not tdist.is_initialized():
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store, key = _get_default_store(), f"composer_growth/wait/{next(_calls)}"
    store.add(key, 1)
    while store.add(key, 0) < dist.get_world_size():
        time.sleep(POLL_SECONDS)
