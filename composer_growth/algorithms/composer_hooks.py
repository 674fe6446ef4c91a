"""Every hook into Composer's private machinery, in one place, each with why no public hook serves.

Composer's public surface is its ``Event``s, ``Algorithm``, ``Callback`` and ``State``. Two things
this suite does are not reachable through it:

* replaying an architecture change before a checkpoint's weights load (:func:`install_replay_hook`);
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
