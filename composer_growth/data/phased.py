"""Train data that switches source mid-epoch: resumable sources and the endless loader over them.

The Trainer iterates the loader it holds at an epoch start, so swapping ``state.dataloader``
mid-epoch has no effect. :class:`PhasedLoader` is one endless iterable the Trainer holds; each batch
comes from whichever source a callable names *now*. :class:`Sources` keeps each source's position
(StreamingDataset resumption state, or batches drawn) so a resumed run continues every source where
it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from composer.utils import dist

BASE = "base"  # the source key of the Trainer's own train loader


def _rows(batch: Any) -> int:
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 0


def loader_len(loader: Any) -> int | None:
    """``len(loader)``, or None for a loader without a length."""
    try:
        return len(loader)
    except TypeError:
        return None


def sample_length(loader: Any) -> int | None:
    """The sequence length of a loader's first sample, read without iterating it (None if unknown)."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return None
    try:
        from composer_growth.data.prepare import sample_ids

        sample = dataset[0]
        return int(len(sample_ids(dict(sample) if isinstance(sample, Mapping) else sample)))
    except Exception:  # noqa: BLE001 - any dataset we cannot index: length unknown
        return None


class LoaderSource:
    """One train loader and where the run is in it: pass (epoch of that loader), batches and samples."""

    def __init__(self, key: str, loader: Any):
        self.key, self.loader = key, loader
        self.iterator = None
        self.passes = self.batches = self.samples = 0
        self.resume: dict[str, Any] | None = None

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    @property
    def streaming(self) -> bool:
        ds = self.dataset
        return hasattr(ds, "state_dict") and hasattr(ds, "load_state_dict")

    def _start(self) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = getattr(self.loader, "sampler", None) if isinstance(self.loader, DataLoader) else None
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.passes)
        skip = 0
        if self.resume is not None:
            self.passes = int(self.resume.get("passes", 0))
            self.samples = int(self.resume.get("samples", 0))
            self.batches = int(self.resume.get("batches", 0))
            if self.streaming and self.resume.get("stream") is not None:
                self.dataset.load_state_dict(self.resume["stream"])  # the stream resumes itself
            else:
                skip = self.batches  # anything else: spin to the position (deterministic loaders only)
            self.resume = None
        self.iterator = iter(self.loader)
        for _ in range(skip):
            next(self.iterator)

    def next(self) -> Any:
        if self.iterator is None:
            self._start()
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.passes += 1
            self.batches = self.samples = 0
            self._start()
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise ValueError(f"the train data {self.key} yields no batch") from None
        self.batches += 1
        self.samples += _rows(batch) * dist.get_world_size()
        return batch

    def state_dict(self) -> dict[str, Any] | None:
        if self.iterator is None:
            return self.resume  # never iterated in this run: keep what was loaded, if anything
        out: dict[str, Any] = {"passes": self.passes, "batches": self.batches, "samples": self.samples}
        if self.streaming:
            out["stream"] = self.dataset.state_dict(self.samples, True)
        return out


class PhasedLoader:
    """The endless iterable the Trainer holds: the next batch of the source ``current()`` names."""

    def __init__(self, current: Callable[[], LoaderSource]):
        self.current = current

    def __iter__(self):
        while True:
            yield self.current().next()


class Sources:
    """Train sources by key, each resuming from the position a checkpoint saved for its key."""

    def __init__(self) -> None:
        self.sources: dict[str, LoaderSource] = {}
        self.saved: dict[str, Any] = {}  # positions loaded from a checkpoint, for sources not built yet
        self.current = BASE

    def add(self, key: str, build: Callable[[], Any]) -> LoaderSource:
        """The source ``key``; on first use built over the loader ``build()`` returns."""
        if key not in self.sources:
            source = LoaderSource(key, build())
            source.resume = self.saved.pop(key, None)
            self.sources[key] = source
        return self.sources[key]

    def loader(self) -> PhasedLoader:
        return PhasedLoader(lambda: self.sources[self.current])

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for key, source in self.sources.items():
            saved = source.state_dict()
            if saved is not None:
                out[key] = saved
        for key, saved in self.saved.items():  # loaded, not used yet in this run
            out.setdefault(key, saved)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = dict(state)
