"""Loaders over the MDS shards written by :mod:`composer_growth.data.prepare` (or llm-foundry's converters)."""

from __future__ import annotations

import os
import weakref
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


def lm_collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed sequences (an ``input_ids`` or llm-foundry's ``tokens`` column) into a causal-LM batch
    (labels = inputs; the model shifts them)."""
    from composer_growth.data.prepare import sample_ids

    ids = torch.from_numpy(np.stack([sample_ids(s).astype(np.int64) for s in samples]))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


#: the StreamingDatasets these loaders built that are still alive (see :func:`end_open_epochs`)
_DATASETS: weakref.WeakSet = weakref.WeakSet()


def end_open_epochs() -> int:
    """End the epoch of every dataset built here that was iterated part way, as its next ``__iter__``
    would: a ``StreamingDataset`` left mid-epoch keeps two threads polling every 7 ms until then
    (a dataset a run no longer reads, or one a test is done with). Returns how many were ended."""
    ended = 0
    for dataset in list(_DATASETS):
        iterator = getattr(dataset, "_iterator", None)
        if iterator is not None and not iterator.should_exit():
            iterator.exit()
            ended += 1
    return ended


def release_shared_memory() -> int:
    """Close and unlink the shared memory of every ``StreamingDataset`` of this process that is gone;
    for a process that trains many runs in turn (a benchmark's, a test session), between runs: it ends
    the open epochs first (:func:`end_open_epochs`: their threads hold the datasets). Returns how many
    blocks it released.

    ``streaming``'s ``SharedMemory`` registers ``atexit.register(self.cleanup)``, so a block (and its
    open file) outlives its dataset until the process exits: about 40 files a run, past the open-file
    limit over a few hundred runs. A block belongs to a dataset by its name's prefix (``000003_...``);
    the blocks whose prefix no live dataset holds are released, as exit would release them.
    """
    import atexit
    import gc

    from streaming import StreamingDataset
    from streaming.base.shared.memory import SharedMemory

    end_open_epochs()
    gc.collect()  # a finished run's State and datasets sit in reference cycles
    objects = gc.get_objects()
    live = {f"{o._shm_prefix_int:06}_" for o in objects
            if isinstance(o, StreamingDataset) and getattr(o, "_shm_prefix_int", None) is not None}
    gone = [o for o in objects if isinstance(o, SharedMemory) and o.shm.name.lstrip("/")[:7] not in live]
    del objects
    for block in gone:
        atexit.unregister(block.cleanup)
        block.cleanup()
    return len(gone)


def build_lm_dataloader(path: str, split: str, device_batch_size: int, shuffle: bool = True, seed: int = 17,
                        num_workers: int = 0, remote: str | None = None, drop_last: bool = True,
                        cache_dir: str | None = None) -> DataLoader:
    """A ``DataLoader`` over ``<path>/<split>`` (or ``<remote>/<split>`` cached under ``path``).

    ``StreamingDataset`` partitions samples across ranks itself (and restores its position
    from Composer checkpoints), so no distributed sampler is added.
    """
    from streaming import StreamingDataset

    from composer_growth.data.prepare import index_problem
    from composer_growth.errors import DataError

    local = os.path.join(cache_dir or path, split)
    problem = None if remote is not None else index_problem(local)
    if problem is not None:
        raise DataError(f"dataset {path}, split {split}: {problem}; rebuild it (prepare-data --overwrite)")
    dataset = StreamingDataset(
        local=local,
        remote=None if remote is None else f"{remote.rstrip('/')}/{split}",
        split=None,
        shuffle=shuffle,
        shuffle_seed=seed,
        batch_size=device_batch_size,
        allow_unsafe_types=False,
    )
    _DATASETS.add(dataset)
    # its own generator: each new iterator draws its base seed from it, not from torch's global RNG, so
    # a resumed run (new iterators) leaves the global stream, and with it dropout's masks, as it was
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=device_batch_size, collate_fn=lm_collate, num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=num_workers > 0, generator=generator)
