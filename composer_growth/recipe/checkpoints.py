"""Which checkpoint a run resumes from, and how many checkpoints a save folder keeps.

Composer's ``autoresume`` loads whatever ``latest-rank0.pt`` points at; a checkpoint cut short (a
full disk, a preempted copy) then stops the run with a long traceback. Here the run looks at the
save folder itself, newest checkpoint first, and resumes from the newest one that can be read; a
damaged one is set aside (renamed ``<name>.damaged``, never deleted) with one line saying which
file and why. The chosen path goes to Composer as ``load_path`` with autoresume's semantics (full
state, no ignored keys), so the growth replay hook reads the very file Composer loads.

Checks are cheap: a ``.pt`` must be a complete zip archive (its central directory read, every member
inside the file); a sharded checkpoint's ``.metadata`` must unpickle and every byte range it lists
must lie inside an existing file. Every rank checks, and a checkpoint counts as good only where all
ranks found it good; rank 0's choice is broadcast.

A remote ``save_folder`` (an object store URI) keeps Composer's own autoresume, minus the stale local
copy it would load instead of the store's latest (:func:`drop_stale_download`): the folder view here
(:func:`list_checkpoints`, :func:`why_unreadable`) is where a listing of the store would plug in.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger

DAMAGED = ".damaged"
_FILE = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")
_SHARDED = re.compile(r"^ep(\d+)-ba(\d+)$")


class CheckpointError(RuntimeError):
    """No checkpoint in the save folder can be read; one line saying which and why."""


@dataclass(frozen=True)
class Checkpoint:
    epoch: int
    batch: int
    path: str  # a .pt file, or a sharded checkpoint's folder

    @property
    def sharded(self) -> bool:
        return os.path.isdir(self.path)

    def files(self) -> list[str]:
        """Every file of this checkpoint (all ranks' files of a monolithic one)."""
        if self.sharded or self.batch < 0:
            return [self.path]
        folder = os.path.dirname(self.path)
        pattern = re.compile(rf"^ep{self.epoch}-ba{self.batch}-rank\d+\.pt$")
        return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if pattern.match(n)]


def list_checkpoints(folder: str) -> list[Checkpoint]:
    """The checkpoints in ``folder`` (Composer's default names), newest first."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        path = os.path.join(folder, name)
        m = _FILE.match(name)
        if m and not os.path.islink(path) and os.path.isfile(path):
            found.append(Checkpoint(int(m[1]), int(m[2]), path))
        m = _SHARDED.match(name)
        if m and os.path.isdir(path):
            found.append(Checkpoint(int(m[1]), int(m[2]), path))
    return sorted(found, key=lambda c: (c.batch, c.epoch), reverse=True)


def resume_candidates(folder: str, latest: str = "latest-rank0.pt") -> list[Checkpoint]:
    """:func:`list_checkpoints`, with what Composer's ``latest`` symlink names first when that is a
    file or folder of another name (a checkpoint copied in by hand)."""
    found = list_checkpoints(folder)
    link = os.path.join(folder, latest)
    if os.path.islink(link):
        target = os.path.normpath(os.path.join(folder, os.readlink(link)))
        if os.path.exists(target) and all(os.path.normpath(c.path) != target for c in found):
            found.insert(0, Checkpoint(-1, -1, target))
    return found


def _why_zip(path: str) -> str | None:
    size = os.path.getsize(path)
    if size == 0:
        return "empty file"
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"member {info.filename} runs past the end of the file ({size} bytes)"
    except zipfile.BadZipFile as e:
        return f"not a complete torch zip archive ({size} bytes: {e})"
    return None


def _why_sharded(path: str) -> str | None:
    meta = os.path.join(path, ".metadata")
    if not os.path.isfile(meta):
        return "no .metadata file"
    try:
        with open(meta, "rb") as f:
            metadata = pickle.load(f)  # noqa: S301 - torch.distributed.checkpoint's own format
    except Exception as e:  # noqa: BLE001 - any unreadable pickle is a damaged checkpoint
        return f".metadata unreadable ({type(e).__name__}: {e})"
    sizes: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = info.relative_path
        if name not in sizes:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                return f"{name} is missing"
            sizes[name] = os.path.getsize(full)
        if info.offset + info.length > sizes[name]:
            return f"{name} is cut short ({sizes[name]} bytes, {info.offset + info.length} listed)"
    return None


def why_unreadable(checkpoint: Checkpoint) -> str | None:
    """Why ``checkpoint`` cannot be loaded, in a few words; None when it looks complete."""
    try:
        if checkpoint.sharded:
            return _why_sharded(checkpoint.path)
        return _why_zip(checkpoint.path)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def readable_or_why(path: str) -> str | None:
    """:func:`why_unreadable` for a checkpoint path of any name (a ``.pt`` file or a sharded folder)."""
    return why_unreadable(Checkpoint(-1, -1, path))


def _set_aside(checkpoint: Checkpoint) -> list[str]:
    moved = []
    for path in checkpoint.files():
        target = path.rstrip(os.sep) + DAMAGED
        n = 1
        while os.path.exists(target):
            target = f"{path.rstrip(os.sep)}{DAMAGED}.{n}"
            n += 1
        os.replace(path, target)
        moved.append(target)
    return moved


def choose_resume(folder: str) -> str | None:
    """The newest checkpoint in ``folder`` that every rank can read (collective; every rank gets the
    same answer). Damaged newer ones are renamed ``*.damaged`` on rank 0, each with one line on stderr.
    None when the folder holds no checkpoint; :class:`CheckpointError` when it holds only damaged ones."""
    import sys

    from composer.utils import dist

    candidates = resume_candidates(folder) if dist.get_global_rank() == 0 else None
    shared = [candidates]
    dist.broadcast_object_list(shared, src=0)
    candidates = shared[0]
    if not candidates:
        return None
    mine = [why_unreadable(c) for c in candidates]
    verdicts = dist.all_gather_object(mine)
    chosen, damaged = None, []
    for i, checkpoint in enumerate(candidates):
        reasons = [(rank, v[i]) for rank, v in enumerate(verdicts) if v[i] is not None]
        if not reasons:
            chosen = checkpoint
            break
        rank, why = reasons[0]
        damaged.append((checkpoint, why if len(verdicts) == 1 else f"{why}, on rank {rank}"))
    if chosen is None:  # every rank saw the same verdicts: all stop with the same line
        reasons = "; ".join(f"{os.path.basename(c.path)}: {why}" for c, why in damaged)
        raise CheckpointError(f"save_folder {folder}: no readable checkpoint to resume from ({reasons}); "
                              "move them away to start afresh, or set autoresume: false")
    if dist.get_global_rank() == 0:
        for checkpoint, why in damaged:
            print(f"composer-growth: checkpoint {checkpoint.path} is unreadable ({why}); set aside as "
                  f"{os.path.basename(checkpoint.path)}{DAMAGED}; resuming from {os.path.basename(chosen.path)}",
                  file=sys.stderr, flush=True)
            _set_aside(checkpoint)
    dist.barrier()
    return chosen.path


def drop_stale_download(save_folder: str, run_name: str | None) -> None:
    """Before Composer's autoresume from a remote ``save_folder``: remove the copy of the store's latest
    checkpoint that an earlier restart downloaded (collective).

    Composer reads the URI as a local path (``./s3:/bucket/run/latest-rank0.pt`` under the working
    folder), downloads the store's latest full checkpoint there, and on a later restart loads that copy,
    when it exists, without asking the store: a run stopped twice would resume from the first stop's
    checkpoint. Without the copy, every restart downloads the store's latest.
    """
    from composer.utils import dist, format_name_with_dist

    path = os.path.abspath(os.path.join(format_name_with_dist(save_folder, run_name), "latest-rank0.pt"))
    if dist.get_local_rank() == 0:
        try:
            os.remove(path)
        except FileNotFoundError:  # none, or another node's rank removed it from a shared folder
            pass
    dist.barrier()


def disk_full(save_folder: str | None, run_name: str | None, error: BaseException) -> OSError | None:
    """An ``OSError(ENOSPC)`` naming the local save folder when ``error`` came with its filesystem
    (nearly) full: less room left than the largest checkpoint there needs. None otherwise."""
    import errno

    from composer.utils import format_name_with_dist

    if save_folder is None or "://" in save_folder:
        return None
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return error
    folder = format_name_with_dist(save_folder, run_name)
    try:
        free = shutil.disk_usage(folder).free
        sizes = [os.path.getsize(c.path) for c in list_checkpoints(folder) if not c.sharded]
    except OSError:
        return None
    if free >= max(sizes, default=1 << 20):
        return None
    what = " ".join(str(error).split())[:120]
    return OSError(errno.ENOSPC, f"No space left on device ({free} bytes free; {type(error).__name__}: {what})",
                   folder)


class KeepCheckpoints(Callback):
    """``save_num_checkpoints_to_keep`` over the whole save folder: after each save rank 0 removes the
    oldest checkpoints there (this run's and earlier runs') beyond ``keep``, never the newest."""

    def __init__(self, folder: str, keep: int):
        self.folder, self.keep = folder, keep

    def _prune(self, state: State) -> None:
        from composer.utils import dist

        if dist.get_global_rank() != 0:
            return  # rank 0 removes only checkpoints older than the newest, which no rank still writes
        for checkpoint in list_checkpoints(self.folder)[max(self.keep, 1):]:
            for path in checkpoint.files():
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune(state)

    def iteration_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._prune(state)

    def state_dict(self) -> dict[str, Any]:
        return {}
