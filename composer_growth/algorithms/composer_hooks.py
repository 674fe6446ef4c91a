"""Every hook into Composer's private machinery, in one place, each with why no public hook serves.

Composer's public surface is its ``Event``s, ``Algorithm``, ``Callback`` and ``State``. These things
this suite does are not reachable through it:

* replaying an architecture change before a checkpoint's weights load (:func:`install_replay_hook`);
* restoring the RNG state of a checkpoint a run resumes from mid-epoch, which Composer leaves unloaded
  when the train dataset resumes itself (:func:`keep_checkpoint_rng`, :func:`restore_skipped_rng`);
* running the length step of every length algorithm once per batch, whichever calls first
  (:func:`first_call_this_batch`): this one needs no private hook, only per-State bookkeeping,
  kept here beside the other per-State record;
* reading back the interval an evaluator runs at (:func:`interval_of`).

Per-State records live in :class:`weakref.WeakKeyDictionary` / :class:`weakref.WeakSet` objects of
this module, not as attributes on Composer's ``State``.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import weakref
from typing import Any

from composer.core import State, Time

from composer_growth.algorithms.base import SuiteAlgorithm

#: the States whose checkpoint loading replays recorded architecture changes
_REPLAYING: weakref.WeakSet[State] = weakref.WeakSet()
#: per State, the RNG states of the checkpoint it loaded, until the first batch of its fit
_CHECKPOINT_RNG: weakref.WeakKeyDictionary[State, Any] = weakref.WeakKeyDictionary()
#: the States whose checkpoint loading keeps the checkpoint's RNG states in ``_CHECKPOINT_RNG``
_KEEPING_RNG: weakref.WeakSet[State] = weakref.WeakSet()
#: per State, the timestamp of the batch whose length step has run (a reference: its id cannot come back)
_LENGTH_PASS: weakref.WeakKeyDictionary[State, Any] = weakref.WeakKeyDictionary()


def first_call_this_batch(state: State) -> bool:
    """True for the first call in a batch, False for every later one (Composer builds a new
    ``Timestamp`` for every batch: one object for every caller of one batch)."""
    if _LENGTH_PASS.get(state) is state.timestamp:
        return False
    _LENGTH_PASS[state] = state.timestamp
    return True


def interval_of(scheduler: Any) -> Time | None:
    """The ``Time`` an interval function of Composer's ``create_interval_scheduler`` was made from
    (an evaluator's ``eval_interval``), or None for another callable.

    Why no public hook serves: ``Evaluator.eval_interval`` turns the interval it is given into a
    closure and keeps nothing else; the interval lives only in that closure's ``time_interval``.
    """
    code, closure = getattr(scheduler, "__code__", None), getattr(scheduler, "__closure__", None)
    if code is None or not closure or "time_interval" not in code.co_freevars:
        return None
    value = closure[code.co_freevars.index("time_interval")].cell_contents
    return value if isinstance(value, Time) else None


def _replay(state: State, saved: Any) -> None:
    """Call ``replay(state, saved_state)`` on every algorithm that has it, in algorithm order, with
    the state saved for it (matched by class name and position among algorithms of that class), and
    keep that state as the algorithm's ``checkpoint_state``."""
    if not isinstance(saved, (list, tuple)):
        return
    by_class: dict[str, list[Any]] = {}
    for cls_name, alg_state in saved:
        by_class.setdefault(cls_name, []).append(alg_state)
    seen: dict[str, int] = {}
    for alg in state.algorithms:
        name = type(alg).__qualname__
        i = seen.get(name, 0)
        seen[name] = i + 1
        entries = by_class.get(name, [])
        if isinstance(alg, SuiteAlgorithm) and i < len(entries):
            alg.checkpoint_state = entries[i]
            alg.replay(state, entries[i])


def install_replay_hook(state: State) -> None:
    """Make checkpoint loading replay recorded architecture changes before the weights load.

    Hook 1: ``state.load_model_state`` is wrapped on this State object. Why no public hook serves:
    ``Event.BEFORE_LOAD`` fires before the Trainer resolves the checkpoint to load (autoresume looks
    for it after the event), so no algorithm can read the saved states there; and Composer loads a
    checkpoint's model weights before it restores any algorithm state, with no event in between
    (``State.load_state_dict`` calls ``load_model_state`` first). The saved algorithm states reach
    ``load_model_state`` as its argument, right before the weights load.
    """
    if state in _REPLAYING:
        return
    original = state.load_model_state

    def load_model_state(state_dict: dict[str, Any], *args: Any, **kwargs: Any):
        _replay(state, state_dict.get("algorithms"))
        return original(state_dict, *args, **kwargs)

    state.load_model_state = load_model_state
    _REPLAYING.add(state)
    _replay_before_sharded_load()
    keep_checkpoint_rng(state)
    from composer_growth.callbacks import ResumeRng

    if not any(isinstance(c, ResumeRng) for c in state.callbacks):  # a Trainer the recipe did not build
        state.callbacks.append(ResumeRng())


def keep_checkpoint_rng(state: State) -> None:
    """Keep the RNG states of the checkpoint ``state``'s Trainer loads, for :func:`restore_skipped_rng`.

    Hook 3: Composer's ``checkpoint.load_checkpoint`` is wrapped (once per process). Why no public hook
    serves: the checkpoint's RNG states (its ``rng`` entry, beside ``state``) reach only the Trainer's
    private ``_rng_state``, the value ``load_checkpoint`` returns; no event or ``State`` field carries them.
    Call it at ``Event.INIT`` (the Trainer loads the checkpoint after that event).
    """
    from composer.utils import checkpoint

    _KEEPING_RNG.add(state)
    original = checkpoint.load_checkpoint
    if getattr(original, "_growth_rng", False):
        return

    def load_checkpoint(*args: Any, **kwargs: Any):
        rng = original(*args, **kwargs)
        loaded = inspect.signature(original).bind(*args, **kwargs).arguments["state"]
        if loaded in _KEEPING_RNG and rng is not None:
            _CHECKPOINT_RNG[loaded] = rng
        return rng

    load_checkpoint._growth_rng = True
    checkpoint.load_checkpoint = load_checkpoint


def restore_skipped_rng(state: State) -> bool:
    """Load the kept RNG states of the checkpoint ``state`` resumed from where Composer leaves them
    unloaded; call it right before a batch is drawn (``Event.BEFORE_DATALOADER``). Returns whether it loaded them.

    Composer loads them at the start of ``fit`` when the checkpoint is at an epoch's start, or while it
    spins a train loader to the checkpoint's batch (``Trainer._train_loop``, composer/trainer/trainer.py
    lines 2401 and 2435 in 0.32.1); with a train dataset that resumes itself (``state.dataset_resumption``:
    a ``StreamingDataset``) and a checkpoint mid-epoch it never loads them, so the resumed run goes on
    with the RNG as the Trainer seeded it (``seed_all`` after ``Event.AFTER_LOAD``), and draws other
    dropout masks than the run it resumes. They are loaded here right before the first batch is drawn,
    where Composer's spinning loads them. Only the first call after a load does anything.
    """
    from composer.utils import reproducibility

    rng = _CHECKPOINT_RNG.pop(state, None)
    skipped = int(state.timestamp.batch_in_epoch) > 0 and bool(state.dataset_resumption.get("train"))
    if rng is None or not skipped:
        return False
    reproducibility.load_rng_state(rng)
    return True


def _saved_algorithm_states(path: str, object_store: Any = None, device_mesh: Any = None) -> Any:
    """The ``algorithms`` entry of a sharded (torch.distributed.checkpoint) Composer checkpoint, read
    alone (collective: every rank reads it). ``path`` is a folder, or with ``object_store`` (a remote
    ``save_folder`` or ``load_path``) the checkpoint's name in that store.

    torch's ``_load_state_dict_from_keys`` is private too: it reads some keys of a distributed
    checkpoint without a template of the whole state, which the public ``dcp.load`` needs. From a store,
    Composer's own reader of sharded checkpoints (``DistCPObjectStoreReader``) downloads the ``.metadata``
    and the shard file that holds the algorithm states, once per node, as Composer's load does.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    keys = {"state.algorithms"}
    if object_store is None:
        if os.path.islink(path):
            path = os.path.join(os.path.dirname(path), os.readlink(path))
        return _load_state_dict_from_keys(keys=keys, checkpoint_id=path).get("state", {}).get("algorithms")
    from composer.utils import dist
    from composer.utils.checkpoint import DistCPObjectStoreReader
    from composer.utils.file_helpers import extract_path_from_symlink

    if path.endswith(".symlink"):
        path = extract_path_from_symlink(path, object_store=object_store)
    with tempfile.TemporaryDirectory() as tmp:
        node_folder = dist.all_gather_object(tmp)[dist.get_global_rank() - dist.get_local_rank()]
        reader = DistCPObjectStoreReader(source_path=path, destination_path=os.path.join(node_folder, "algorithms"),
                                         object_store=object_store, device_mesh=device_mesh)
        saved = _load_state_dict_from_keys(keys=keys, storage_reader=reader)
        dist.barrier()  # the node's local rank 0 keeps its folder until every rank there has read it
    return saved.get("state", {}).get("algorithms")


def _without_progress_bar(ignore_keys: Any) -> Any:
    """``ignore_keys`` for Composer's sharded load that also leaves the progress bar's state out of the
    template. Why: the template is the current state, and a fresh run's ``ProgressBarLogger`` has no bar yet
    (``train_pbar: None``, one leaf) while the saved one had a bar (a dict of leaves), so torch's loader stops
    with "Missing key in checkpoint state_dict: state.callbacks.ProgressBarLogger.train_pbar" on every
    sharded resume with a progress bar. The bar's state is its display only."""
    from composer.utils.checkpoint import glob_filter

    given = glob_filter(ignore_keys) if isinstance(ignore_keys, (list, tuple)) else ignore_keys

    def ignore(state_dict: dict[str, Any]) -> None:
        if given is not None:
            given(state_dict)
        callbacks = (state_dict.get("state") or {}).get("callbacks")
        if isinstance(callbacks, dict):
            callbacks.pop("ProgressBarLogger", None)

    return ignore


def install_sharded_load_fixes() -> None:
    """The sharded-load wrapper (:func:`_replay_before_sharded_load`) without growth: a recipe run under FSDP
    installs it for the progress-bar fix (:func:`_without_progress_bar`)."""
    _replay_before_sharded_load()


def _replay_before_sharded_load() -> None:
    """Hook 2: Composer's ``checkpoint.load_sharded_checkpoint`` is wrapped (once per process).

    Why no public hook serves: a sharded (FSDP) checkpoint is read into a template Composer builds
    from the current model (``state.state_dict()``) before ``load_model_state`` runs, so hook 1
    comes too late there: the template would drop a grown model's new tensors. The wrapper reads
    the checkpoint's algorithm states first and replays them before Composer builds the template.
    A state without the replay hook loads exactly as before.
    """
    from composer.utils import checkpoint

    original = checkpoint.load_sharded_checkpoint
    if getattr(original, "_growth_replay", False):
        return

    def load_sharded_checkpoint(*args: Any, **kwargs: Any):
        bound = inspect.signature(original).bind(*args, **kwargs)
        state, path = bound.arguments["state"], bound.arguments["source_path"]
        if state in _REPLAYING:
            _replay(state, _saved_algorithm_states(path, bound.arguments.get("object_store"), state.device_mesh))
        bound.arguments["ignore_keys"] = _without_progress_bar(bound.arguments.get("ignore_keys"))
        return original(*bound.args, **bound.kwargs)

    load_sharded_checkpoint._growth_replay = True
    checkpoint.load_sharded_checkpoint = load_sharded_checkpoint


def release_finished_trainers() -> None:
    """Let every closed Trainer of this process be freed; for a process that trains many in turn (a
    benchmark's runs, a test session). Call it only while no Trainer is open.

    Two process-wide references keep a Trainer's ``State`` (its model, optimizer, loaders and their
    ``StreamingDataset`` shared memory: about 40 open files a run) alive after ``close``: Composer's
    ``Engine`` registers ``atexit.register(Engine._close, state, logger)`` and only unregisters it when
    the engine is deleted, which that very registration prevents (composer/core/engine.py, 0.32); and
    torch's ``functools.cache`` on ``torch.distributed.checkpoint.state_dict._get_fqns`` keys on the model.
    """
    import atexit

    from composer.core.engine import Engine
    from torch.distributed.checkpoint import state_dict

    atexit.unregister(Engine._close)
    state_dict._get_fqns.cache_clear()
