"""Context-length schedule: train in phases of growing sequence length, with RoPE scaling per phase.

A phase says how long the sequences are, for how long (a Composer ``Time``: ``"10000ba"``,
``"3e8tok"``, ``"0.6dur"``), how the model's rotary embedding is configured while it runs, and
optionally where its data comes from. At a phase start this Algorithm

* rebuilds the model's rope config and rotary buffers through transformers' own rope init
  (:func:`~composer_growth.functional.rope.apply_rope_scaling`), so the model computes what a model
  freshly built from the new config would;
* gives the batches the phase's length: longer data is cut with the batch op of the sequence-length
  warmup (``reshape`` keeps every token, ``truncate`` drops each row's tail); a phase that names a
  ``dataset`` trains on data prepared at (at least) its length, so nothing is ever padded;
* keeps tokens per optimizer step constant (the loader rows and the microbatch rows follow the
  length) unless the phase sets ``global_batch_size``, and scales the learning rate by the phase's
  ``lr_multiplier`` on top of the recipe's scheduler.

At a phase end it logs perplexity at every phase length trained so far and writes
``<save_folder>/<phase name>/``: a Composer checkpoint and an HF export (weights, the phase's config,
the tokenizer; LoRA adapters in ``adapter/``) that ``from_pretrained`` loads with its rope config.

Data switching: the Trainer iterates the loader it holds at an epoch start, so swapping
``state.dataloader`` mid-epoch has no effect. When some phase names a dataset, the Algorithm hands
the Trainer (at ``FIT_START``) one endless loader that yields the next batch of the *current*
phase's source (the Trainer's own loader, or a loader it builds over the phase's dataset), keeps
each source's position, and saves those positions (StreamingDataset resumption state) in its own
state, so a resumed run continues every source where it stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist, ensure_tuple

from composer_growth.algorithms.order import set_batch_lengths
from composer_growth.algorithms.surgery import gather_hf_state_dict, install_replay_hook, save_pretrained
from composer_growth.errors import ConfigError, check
from composer_growth.families import FAMILIES, Family, config_get, family_of, unwrap_composer, unwrap_hf
from composer_growth.functional.batch import MODES, batch_seq_length, batch_tokens, set_batch_sequence_length
from composer_growth.functional.lora import merged_state_dict
from composer_growth.functional.rope import (apply_rope_scaling, max_addressable_positions, position_kind,
                                            validate_rope_scaling)
from composer_growth.registry import register_algorithm
from composer_growth.runfacts import RunFacts
from composer_growth.timeutil import check_progress_known, elapsed, parse_time, uncount_tokens

log = logging.getLogger(__name__)

PHASE_KEYS = ("name", "seq_length", "duration", "rope_scaling", "microbatch_size", "lr_multiplier", "description",
              "dataset", "prepare", "global_batch_size", "max_position_embeddings")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_EPS = 1e-6
BASE = "base"  # the source key of the Trainer's own train loader


# --------------------------------------------------------------------------- phases


@dataclass
class Phase:
    """One phase of the schedule, checked and normalised."""
    index: int
    name: str
    seq_length: int
    duration: Time | None              # None: the last phase, covering the rest of the run
    rope_scaling: dict[str, Any] | None  # normalised; None: the model's own rope as built or loaded
    microbatch_size: int | None
    lr_multiplier: float
    description: str
    dataset: str | None
    prepare: dict[str, Any] | None
    global_batch_size: int | None
    max_position_embeddings: int | None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "seq_length": self.seq_length,
            "duration": None if self.duration is None else str(self.duration),
            "rope_scaling": self.rope_scaling, "microbatch_size": self.microbatch_size,
            "lr_multiplier": self.lr_multiplier, "dataset": self.dataset,
            "global_batch_size": self.global_batch_size, "description": self.description,
        }


def _positive_int(value: Any, key: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    check(isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1, key, value,
          "a positive integer")
    return int(value)


def _parse_phase(i: int, raw: Any, n: int) -> Phase:
    key = f"phases[{i}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(key, raw, "a mapping with name, seq_length, duration and optional rope_scaling, "
                                    "microbatch_size, lr_multiplier, description, dataset")
    for k in raw:
        if k not in PHASE_KEYS:
            raise ConfigError(f"{key}.{k}", raw[k], f"unknown key; allowed: {', '.join(PHASE_KEYS)}")
    name = raw.get("name", f"phase{i}")
    check(isinstance(name, str) and bool(_NAME.match(name)), f"{key}.name", name,
          "a folder name: letters, digits, '.', '_', '-'")
    seq = _positive_int(raw.get("seq_length"), f"{key}.seq_length", allow_none=False)
    if raw.get("duration") is None:
        if i != n - 1:
            raise ConfigError(f"{key}.duration", None, "required (only the last phase may leave it out: "
                                                       "it covers the rest of the run)")
        duration = None
    else:
        duration = parse_time(raw["duration"], f"{key}.duration")
        check(float(duration.value) > 0, f"{key}.duration", raw["duration"], "a positive time")
    rope = raw.get("rope_scaling")
    if rope is not None:
        rope = validate_rope_scaling(rope, f"{key}.rope_scaling")
    mult = raw.get("lr_multiplier", 1.0)
    mult = 1.0 if mult is None else mult
    check(isinstance(mult, numbers.Real) and not isinstance(mult, bool) and math.isfinite(mult) and mult > 0,
          f"{key}.lr_multiplier", mult, "a number > 0")
    description = raw.get("description") or ""
    check(isinstance(description, str), f"{key}.description", description, "a string")
    dataset = raw.get("dataset")
    check(dataset is None or (isinstance(dataset, str) and dataset.strip() != ""), f"{key}.dataset", dataset,
          "null or the folder of a prepared dataset (composer-growth prepare-data)")
    prepare = raw.get("prepare")
    if prepare is not None:
        check(isinstance(prepare, Mapping), f"{key}.prepare", prepare, "a mapping of prepare-data options")
        check(dataset is not None, f"{key}.prepare", prepare, "needs phases[i].dataset: the folder to build")
        prepare = dict(prepare)
    gbs = _positive_int(raw.get("global_batch_size"), f"{key}.global_batch_size")
    if gbs is not None:
        check(dataset is not None, f"{key}.global_batch_size", gbs,
              "needs phases[i].dataset (phases without one train on the Trainer's own batches)")
    return Phase(index=i, name=name, seq_length=seq, duration=duration, rope_scaling=rope,
                 microbatch_size=_positive_int(raw.get("microbatch_size"), f"{key}.microbatch_size"),
                 lr_multiplier=float(mult), description=description, dataset=dataset, prepare=prepare,
                 global_batch_size=gbs,
                 max_position_embeddings=_positive_int(raw.get("max_position_embeddings"),
                                                       f"{key}.max_position_embeddings"))


# --------------------------------------------------------------------------- rope per phase


def _rope_snapshot(config: Any, family: Family) -> dict[str, Any]:
    """The rope fields of a config: what a phase with ``rope_scaling: null`` trains with."""
    theta = None
    for name in family.rope_theta_keys:
        if config_get(config, name) is not None:
            theta = float(config_get(config, name))
            break
    return {
        "rope_scaling": copy.deepcopy(family.rope_scaling(config)),
        "rope_theta": theta,
        "max_positions": int(config_get(config, family.max_positions_key)),
        "original_max_position_embeddings": getattr(config, "original_max_position_embeddings", None),
        "positions": family.positions(config),
    }


def _rope_type(scaling: Mapping[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


@dataclass
class _RopeTarget:
    scaling: dict[str, Any] | None  # what apply_rope_scaling gets (with rope_theta); None: no rotary
    max_positions: int              # the config's declared context in the phase
    reach: float                    # the longest sequence the phase's positions address
    kind: str = "rope"              # the model's positions: rope, alibi or learned

    @property
    def factor(self) -> float:
        return float((self.scaling or {}).get("factor") or 1.0)

    @property
    def theta(self) -> float | None:
        return (self.scaling or {}).get("rope_theta")


def _rope_target(phase: Phase, original: dict[str, Any], family: Family, config: Any = None) -> _RopeTarget:
    """The rope config of ``phase`` on a model whose own rope is ``original``; checked against ``config``.

    The declared max positions stay the model's unless the phase sets ``max_position_embeddings``, or its
    rope type reads the declared context as the *extended* one (``yarn`` with
    ``original_max_position_embeddings``, ``llama3``): then it is ``factor x original``.
    """
    key = f"phases[{phase.index}]"
    p0 = original["max_positions"]
    kind = position_kind(family, config) if config is not None else original.get("positions") or position_kind(family)
    if kind != "rope":
        if phase.rope_scaling is not None:
            validate_rope_scaling(phase.rope_scaling, f"{key}.rope_scaling", family, config=config)  # raises: no RoPE
        # ALiBi extends to any length with no scaling, up to what the model accepts (positions_bound)
        reach = p0 if kind == "learned" or family.positions_bound else math.inf
        return _RopeTarget(None, p0, reach, kind)
    if phase.rope_scaling is not None:
        scaling = dict(phase.rope_scaling)
    elif original["rope_scaling"]:
        scaling = dict(original["rope_scaling"])
    else:
        scaling = {"rope_type": "default"}
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = original["rope_theta"]
    rtype = _rope_type(scaling)
    if phase.max_position_embeddings is not None:
        declared = phase.max_position_embeddings
    elif rtype in ("yarn", "llama3") and scaling.get("original_max_position_embeddings") and scaling.get("factor"):
        declared = max(p0, int(round(float(scaling["factor"]) * int(scaling["original_max_position_embeddings"]))))
    else:
        declared = p0
    full = {**scaling, **({"rope_theta": theta} if theta is not None else {})}
    full = validate_rope_scaling(full, f"{key}.rope_scaling", family, max_position_embeddings=declared,
                                 original_max_position_embeddings=original.get("original_max_position_embeddings"),
                                 config=config) or {"rope_type": "default"}
    view = {"model_type": family.name, family.max_positions_key: declared,
            "rope_scaling": {k: v for k, v in full.items() if k != "rope_theta"},
            "original_max_position_embeddings": original.get("original_max_position_embeddings")}
    reach = max_addressable_positions(view, bound=False)
    if family.positions_bound and phase.max_position_embeddings is None:
        # the model refuses sequences past its declared context: raise it to what the phase trains,
        # as far as the rope reaches
        declared = max(declared, min(phase.seq_length, int(min(reach, 2**62))))
        reach = min(reach, declared)
    return _RopeTarget(full, declared, reach)


def _describe(target: _RopeTarget) -> str:
    if target.kind == "alibi":
        return "ALiBi (longer sequences need no scaling)"
    if target.scaling is None:
        return "learned positions"
    rtype = _rope_type(target.scaling)
    text = "rope " + (rtype if rtype == "default" else f"{rtype} x{target.factor:g}")
    if target.theta is not None:
        text += f", theta {target.theta:g}"
    return text


# --------------------------------------------------------------------------- data sources


def _rows(batch: Any) -> int:
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 0



def _sample_length(loader: Any) -> int | None:
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


class _Source:
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
                raise ValueError(f"ContextLengthSchedule: the train data {self.key} yields no batch") from None
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


class _PhasedLoader:
    """The endless iterable the Trainer holds: the next batch of the current phase's source."""

    def __init__(self, schedule: ContextLengthSchedule):
        self._schedule = schedule

    def __iter__(self):
        while True:
            yield self._schedule._next_batch()


# --------------------------------------------------------------------------- the algorithm


@register_algorithm("context_length_schedule")
class ContextLengthSchedule(Algorithm):
    """Extend a model's context in phases of growing sequence length, each with its own RoPE config.

    Args:
        phases: a list of mappings, one per phase, lengths strictly increasing:

            * ``name``: the phase's folder name under ``save_folder`` (default ``phase<i>``);
            * ``seq_length``: the training sequence length;
            * ``duration``: a Composer time (``"10000ba"``, ``"3e8tok"``, ``"5000sp"``, ``"1ep"``) or a share
              of the run (``"0.6dur"``, or a bare float); every phase in one unit, shares mixing only with
              max_duration's unit. The last phase covers the rest of the run (a warning says so when the
              durations do not add up to max_duration);
            * ``rope_scaling``: ``null`` (the model's own rope, as built or loaded) or transformers' own
              dict (``rope_type``/``type``: linear, dynamic, yarn, llama3, longrope, default, with their
              parameters), optionally with ``rope_theta``;
            * ``max_position_embeddings``: the config's declared context in the phase (default: the model's,
              or ``factor x original_max_position_embeddings`` for yarn-with-original and llama3);
            * ``microbatch_size``: rows per microbatch (default: the Trainer's, scaled so tokens per
              microbatch stay those of the Trainer's microbatch at the data's length);
            * ``lr_multiplier``: multiplies the scheduled learning rate while the phase runs;
            * ``dataset``: a prepared dataset folder (``manifest.json``, ``train/``, ``val/``) with
              sequences at least ``seq_length`` long; ``prepare``: prepare-data options to build it on
              first use when it does not exist (``seq_len`` defaults to the longest phase using it,
              ``tokenizer`` to the recipe's);
            * ``global_batch_size``: rows per optimizer step at this phase's length (phases with a
              dataset only; default: keep tokens per step);
            * ``description``: free text, logged with the schedule.
        enabled: ``False`` leaves training untouched.
        save_folder: where ``<phase name>/`` folders go at each phase end (default: the Trainer's
            ``save_folder``; with neither, no phase checkpoints or exports, said once at the start).
        mode: how batches longer than the phase are cut: ``reshape`` (keep every token in more rows)
            or ``truncate`` (keep each row's head).
        tokens_per_step: tokens per optimizer step over all ranks (default: the Trainer's global batch
            times the length of its data).
        save_checkpoints: write ``<phase>/checkpoint.pt`` (a Composer checkpoint) at each phase end.
        export_hf: write an HF export (``save_pretrained``) at each phase end.
        export_base_weights: with LoRA, also export the (frozen) base weights next to ``adapter/``.
        eval_batches: batches per length for the perplexity at every phase length at each phase end
            (0: none).
        eval_labels: the evaluators that run at the current phase's length.
        train_split, eval_split: the splits of phase datasets.
        shuffle: shuffle phase datasets (seeded with the Trainer's seed).
        num_workers: DataLoader workers of phase datasets.
        verbose: print the schedule and each transition (rank 0).
    """

    name = "context_length_schedule"

    def __init__(self, phases: list[dict[str, Any]], enabled: bool = True, save_folder: str | None = None,
                 mode: str = "reshape", tokens_per_step: int | None = None, save_checkpoints: bool = True,
                 export_hf: bool = True, export_base_weights: bool = True, eval_batches: int = 4,
                 eval_labels: list[str] | tuple[str, ...] = ("eval",), train_split: str = "train",
                 eval_split: str = "val", shuffle: bool = True, num_workers: int = 0, verbose: bool = True):
        check(isinstance(enabled, bool), "enabled", enabled, "true or false")
        check(isinstance(phases, (list, tuple)) and len(phases) > 0, "phases", phases,
              "a non-empty list of phases (name, seq_length, duration, ...)")
        self.phases = [_parse_phase(i, raw, len(phases)) for i, raw in enumerate(phases)]
        names = [p.name for p in self.phases]
        for i, name in enumerate(names):
            check(name not in names[:i], f"phases[{i}].name", name, "a name no other phase has")
        for i in range(1, len(self.phases)):
            prev, cur = self.phases[i - 1].seq_length, self.phases[i].seq_length
            check(cur > prev, f"phases[{i}].seq_length", cur,
                  f"longer than the previous phase's ({prev}): lengths must increase")
        check(mode in MODES, "mode", mode, f"one of {', '.join(MODES)}")
        check(save_folder is None or isinstance(save_folder, str), "save_folder", save_folder, "null or a folder")
        self.tokens_per_step = _positive_int(tokens_per_step, "tokens_per_step")
        check(isinstance(eval_batches, int) and eval_batches >= 0, "eval_batches", eval_batches, "an integer >= 0")
        check(isinstance(num_workers, int) and num_workers >= 0, "num_workers", num_workers, "an integer >= 0")
        self.enabled, self.save_folder, self.mode = enabled, save_folder, mode
        self.save_checkpoints, self.export_hf, self.export_base_weights = save_checkpoints, export_hf, export_base_weights
        self.eval_batches, self.eval_labels = eval_batches, tuple(ensure_tuple(eval_labels))
        self.train_split, self.eval_split = train_split, eval_split
        self.shuffle, self.num_workers, self.verbose = shuffle, num_workers, verbose
        self._schedule(None)  # unit checks that need no max_duration
        # what a recipe tells us (validate_run); read again when the Trainer starts
        self._recipe: dict[str, Any] = {}
        # run state (saved: phase, original, exported, base_len, base_mb, tokens, sources)
        self._phase = 0
        self._original: dict[str, Any] | None = None
        self._family: Family | None = None
        self._exported: list[str] = []
        self._base_len: int | None = None
        self._base_mb: int | None = None
        self._tokens: int | None = None  # tokens per optimizer step, all ranks
        self._base_rows: int | None = None  # rows per batch of the Trainer's loader on this rank
        self._sources: dict[str, _Source] = {}
        self._phase_sources: dict[str, str] = {}
        self._resume_sources: dict[str, Any] = {}
        self._loader: _PhasedLoader | None = None
        self._current_source = BASE
        self._unit: TimeUnit | None = None
        self._starts: list[float] | None = None
        self._token_excess = 0
        self._batch_cut = False
        self._lr_saved: list[float] | None = None
        self._sched_steps: list[int] = []
        self._eval_active = False
        self._eval_loaders: dict[str, Any] = {}
        self._warned: set[str] = set()
        self._events: list[dict[str, Any]] = []  # phase changes, for the run summary
        self._tmp_tokenizer: str | None = None

    # ------------------------------------------------------------------ schedule

    @property
    def phase(self) -> Phase:
        """The phase the model is configured for (the one of the last trained batch)."""
        return self.phases[self._phase]

    def _warn_once(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            warnings.warn(text)

    def _schedule(self, max_duration: Time | None) -> bool:
        """Compute each phase's start in one unit; False when that needs max_duration and it is unknown."""
        durations = [p.duration for p in self.phases]
        units = {d.unit for d in durations if d is not None and d.unit != TimeUnit.DURATION}
        if len(units) > 1:
            raise ConfigError("phases", [str(d) for d in durations],
                              "durations in one unit, or shares of the run ('dur')")
        shares = [i for i, d in enumerate(durations) if d is not None and d.unit == TimeUnit.DURATION]
        max_unit = max_duration.unit if max_duration is not None else None
        if units:
            unit = next(iter(units))
            if shares and max_duration is not None and max_unit != unit:
                i = shares[0]
                raise ConfigError(f"phases[{i}].duration", str(durations[i]),
                                  f"a share of the run ('dur') mixes with {unit.value} durations only when "
                                  f"max_duration is in {unit.value} (it is {max_duration})")
        elif max_unit is not None:
            unit = max_unit
        elif shares:
            return False
        else:
            unit = TimeUnit.BATCH
        if shares and max_duration is None:
            return False
        values = [None if d is None else float(d.value) * (float(max_duration.value) if d.unit == TimeUnit.DURATION
                                                           else 1.0) for d in durations]
        starts, total = [0.0], 0.0
        for v in values[:-1]:
            total = math.fsum([total, v])
            starts.append(round(total, 6))
        self._unit, self._starts = unit, starts
        if max_duration is None:
            return True
        last = self.phases[-1]
        if unit == max_unit:
            run = float(max_duration.value)
            for i in range(1, len(starts)):
                # a phase starts with the first batch at or past its start: batch counts are whole
                first = math.ceil(starts[i] - _EPS) if unit == TimeUnit.BATCH else starts[i]
                if first >= run - _EPS:
                    raise ConfigError(f"phases[{i}]", self.phases[i].name,
                                      f"starts at {starts[i]:g}{unit.value}, when the run has ended "
                                      f"(max_duration={max_duration}): shorten the phases before it")
            if values[-1] is not None:
                end = math.fsum([starts[-1], values[-1]])
                if abs(end - run) > _EPS * max(1.0, run):
                    self._warn_once(
                        f"ContextLengthSchedule: the phases add up to {end:g}{unit.value}, max_duration is "
                        f"{run:g}{unit.value}: the last phase '{last.name}' covers the rest of the run "
                        f"({run - starts[-1]:g}{unit.value} instead of {values[-1]:g}{unit.value})")
        else:
            self._warn_once(
                f"ContextLengthSchedule: phases are measured in {unit.value} and max_duration in {max_unit.value}: "
                f"the last phase '{last.name}' covers the rest of the run, however long that is")
        return True

    def _phase_at(self, state: State) -> int:
        if self._starts is None and not self._schedule(state.max_duration):
            return self._phase
        return max(self.phase_index(lambda unit: elapsed(state, unit)), self._phase)

    def phase_index(self, now) -> int:
        """The phase a batch trains in when the run has done ``now(unit)`` of each unit (after ``_schedule``)."""
        done = now(self._unit)
        index = 0
        for j, start in enumerate(self._starts):
            if done >= start - _EPS:
                index = j
        return index

    def plan_length(self, now, length: int) -> int:
        """``composer-growth plan``: the length a batch trains at in the phase of ``now``."""
        return self.phases[self.phase_index(now)].seq_length

    def plan_rope(self, index: int, config: Any) -> dict[str, Any]:
        """``composer-growth plan``: the positions of phase ``index`` on a model with ``config`` (as built)."""
        family = family_of(getattr(config, "model_type", None), key="model")
        target = _rope_target(self.phases[index], _rope_snapshot(config, family), family, config)
        if target.kind == "alibi":
            return {"rope_type": "alibi", "rope_factor": None, "positions": "ALiBi: no scaling needed"}
        if target.kind != "rope":
            return {"rope_type": target.kind, "rope_factor": None, "positions": _describe(target)}
        return {"rope_type": _rope_type(target.scaling), "rope_factor": target.factor, "positions": _describe(target)}

    # ------------------------------------------------------------------ validation

    def _bind_recipe(self, facts: RunFacts) -> None:
        """Take what a recipe knows: save_folder, the data's path, tokenizer, prepare options, batch size."""
        if self.save_folder is None:
            self.save_folder = facts.save_folder
        self._recipe = {
            "data_path": facts.data_path,
            "manifest": facts.manifest,
            "base_len": facts.data_seq_len,
            "tokenizer": facts.tokenizer,
            "prepare": dict(facts.data_prepare),
            "global_batch": facts.global_batch,
            "world": facts.world_size,
            "shuffle": facts.data_shuffle,
            "num_workers": facts.data_num_workers,
        }

    def validate_run(self, facts: RunFacts) -> None:
        """Check the schedule against the run, the model's config and the phase datasets."""
        if not self.enabled:
            return
        self.run_facts = facts
        max_duration = facts.max_duration
        if facts.has_recipe:
            self._bind_recipe(facts)
        self._schedule(max_duration)
        if self._uses_datasets() and (max_duration.unit == TimeUnit.EPOCH or self._unit == TimeUnit.EPOCH):
            raise ConfigError("max_duration" if max_duration.unit == TimeUnit.EPOCH else "phases", str(max_duration),
                              "in ba, tok or sp when phases switch datasets (an epoch of several datasets "
                              "is undefined)")
        if not facts.has_recipe:
            return
        config = facts.model_config
        if config is not None:
            family = FAMILIES.get(getattr(config, "model_type", None))
            if family is not None:
                self.check_model_config(config, family)
        self._check_data()

    def check_model_config(self, config: Any, family: Family | None = None,
                           original: dict[str, Any] | None = None) -> list[_RopeTarget]:
        """Each phase's rope config on this model; ConfigError for a length its positions cannot address."""
        family = family or family_of(config, key="model")
        original = original or _rope_snapshot(config, family)
        targets = []
        for phase in self.phases:
            target = _rope_target(phase, original, family, config)
            if phase.seq_length > target.reach:
                if target.kind == "alibi":
                    allowed = (f"at most {family.name}'s {family.max_positions_key} ({original['max_positions']}): "
                               f"ALiBi needs no scaling, but the model refuses longer sequences; build it with "
                               f"{family.max_positions_key} >= {max(p.seq_length for p in self.phases)}")
                elif target.kind == "learned":
                    allowed = (f"at most {family.name}'s learned position table ({family.max_positions_key}="
                               f"{original['max_positions']}); {family.name} has no RoPE to scale")
                else:
                    allowed = (f"beyond what the phase's rope config can address ({target.reach:g} positions: "
                               f"{_describe(target)}, {family.max_positions_key}={target.max_positions}); "
                               "give the phase a rope_scaling that reaches it")
                raise ConfigError(f"phases[{phase.index}].seq_length", phase.seq_length, allowed)
            targets.append(target)
        return targets

    def _uses_datasets(self) -> bool:
        return any(p.dataset is not None for p in self.phases)

    def _dataset_paths(self) -> dict[str, list[Phase]]:
        paths: dict[str, list[Phase]] = {}
        for p in self.phases:
            if p.dataset is not None:
                paths.setdefault(p.dataset, []).append(p)
        return paths

    def _prepare_options(self, path: str, users: list[Phase]) -> dict[str, Any] | None:
        """prepare-data options for a missing phase dataset (None: no phase says how to build it)."""
        blocks = [p.prepare for p in users if p.prepare is not None]
        if not blocks:
            return None
        options = dict(self._recipe.get("prepare") or {})
        options.pop("seq_len", None)  # data.prepare's length is data.path's, not this dataset's
        options["tokenizer"] = self._recipe.get("tokenizer")  # token ids must agree across phases
        for block in blocks:
            options.update(block)
        if options.get("seq_len") is None:
            options["seq_len"] = max(p.seq_length for p in users)
        return options

    def _check_data(self) -> None:
        """Phase datasets exist (or say how to be built), are long enough, and share the tokenizer."""
        from composer_growth.data.prepare import SOURCES, read_manifest
        from composer_growth.recipe.schema import PrepareConfig, from_mapping

        base_len = self._recipe.get("base_len")
        base_manifest = self._recipe.get("manifest")
        for p in self.phases:
            if p.dataset is None and base_len is not None and p.seq_length > base_len:
                raise ConfigError(f"phases[{p.index}].seq_length", p.seq_length,
                                  f"longer than the sequences of data.path ({base_len} tokens in "
                                  f"{self._recipe['data_path']}): give the phase a dataset prepared at "
                                  f">= {p.seq_length} tokens (phases[{p.index}].dataset)")
        lengths: dict[str, int] = {}
        for path, users in self._dataset_paths().items():
            first = users[0]
            key = f"phases[{first.index}]"
            manifest = read_manifest(path)
            if manifest is None:
                options = self._prepare_options(path, users)
                if options is None:
                    raise ConfigError(f"{key}.dataset", path,
                                      "no dataset there (no manifest.json); prepare it with `composer-growth "
                                      f"prepare-data --out {path} --seq-len {max(p.seq_length for p in users)}` "
                                      "(with data.path's tokenizer) or give the phase a prepare block")
                with_prepare = next(p for p in users if p.prepare is not None)
                clean = from_mapping(PrepareConfig, {k: v for k, v in options.items() if v is not None or k in
                                                     ("tokenizer", "files", "hub_name")},
                                     f"phases[{with_prepare.index}].prepare")
                check(clean.source in SOURCES, f"phases[{with_prepare.index}].prepare.source", clean.source,
                      f"one of {', '.join(SOURCES)}")
                lengths[path] = clean.seq_len
            else:
                lengths[path] = int(manifest["seq_len"])
                if self.train_split not in manifest.get("splits", {}):
                    raise ConfigError(f"{key}.dataset", path,
                                      f"has no '{self.train_split}' split (splits: {', '.join(manifest.get('splits', {}))})")
                vocabs = (manifest.get("vocab_size"), (base_manifest or {}).get("vocab_size"))
                if None not in vocabs and vocabs[0] != vocabs[1]:
                    raise ConfigError(f"{key}.dataset", path,
                                      f"its tokenizer has {manifest.get('vocab_size')} tokens, data.path's "
                                      f"{base_manifest.get('vocab_size')}: prepare it with data.path's tokenizer")
            for p in users:
                if lengths[path] < p.seq_length:
                    if manifest is None:  # the prepare block asks for too short a length
                        bad_key, bad = f"phases[{with_prepare.index}].prepare.seq_len", lengths[path]
                    else:
                        bad_key, bad = f"phases[{p.index}].dataset", path
                    raise ConfigError(bad_key, bad, f"sequences of {lengths[path]} tokens, shorter than "
                                                    f"phases[{p.index}].seq_length ({p.seq_length})")
        self._check_batches(lengths)

    def _check_batches(self, lengths: dict[str, int]) -> None:
        """Every phase loader gets a whole number of rows per rank."""
        world = self._recipe.get("world", 1)
        gbs, base_len = self._recipe.get("global_batch"), self._recipe.get("base_len")
        base_tokens = gbs * base_len if gbs and base_len else None
        if self.tokens_per_step is not None and base_tokens is not None and base_tokens != self.tokens_per_step:
            for p in self.phases:
                if p.dataset is None:
                    raise ConfigError("tokens_per_step", self.tokens_per_step,
                                      f"phases without a dataset ({p.name}) train on data.path's batches of "
                                      f"{gbs} x {base_len} = {base_tokens} tokens per step")
        tokens = self.tokens_per_step or base_tokens
        for p in self.phases:
            if p.dataset is None or p.dataset not in lengths:
                continue
            try:
                self._loader_rows(p, lengths[p.dataset], tokens, world)
            except ValueError as err:
                key = f"phases[{p.index}].global_batch_size" if p.global_batch_size else (
                    "tokens_per_step" if self.tokens_per_step else "global_train_batch_size")
                value = p.global_batch_size or self.tokens_per_step or gbs
                raise ConfigError(key, value, str(err)) from None

    def _loader_rows(self, phase: Phase, length: int, tokens: int | None, world: int) -> int:
        """Rows per rank of a phase loader over data of ``length`` tokens."""
        step = phase.global_batch_size * phase.seq_length if phase.global_batch_size else tokens
        if step is None:
            raise ValueError(f"phase '{phase.name}': tokens per step unknown; set tokens_per_step")
        if step % (length * world) or step < length * world:
            raise ValueError(f"{step} tokens per step do not split into whole rows of {length} tokens "
                             f"({phase.dataset}) on each of {world} ranks")
        return step // (length * world)

    # ------------------------------------------------------------------ events

    # A frozenset: Composer asks every algorithm about every event, and a tuple compares with Event's
    # slow __eq__ once per member (12 here: tens of microseconds per step); a set hashes once.
    _EVENTS = frozenset((
        Event.INIT, Event.AFTER_LOAD, Event.FIT_START, Event.BEFORE_DATALOADER, Event.AFTER_DATALOADER,
        Event.BATCH_START, Event.BATCH_END, Event.BATCH_CHECKPOINT, Event.EVAL_START, Event.EVAL_BATCH_START,
        Event.EVAL_END, Event.FIT_END))

    def match(self, event: Event, state: State) -> bool:
        return self.enabled and event in self._EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        handler = {
            Event.INIT: self._init, Event.AFTER_LOAD: self._after_load, Event.FIT_START: self._fit_start,
            Event.BEFORE_DATALOADER: self._before_dataloader,
            Event.AFTER_DATALOADER: lambda state, logger: set_batch_lengths(self, state, logger),
            Event.BATCH_START: self._batch_start, Event.BATCH_END: self._batch_end,
            Event.BATCH_CHECKPOINT: self._batch_checkpoint, Event.EVAL_START: self._eval_start,
            Event.EVAL_BATCH_START: self._eval_batch_start, Event.EVAL_END: self._eval_end,
            Event.FIT_END: self._fit_end,
        }[event]
        handler(state, logger)

    def _init(self, state: State, logger: Logger) -> None:
        hf = unwrap_hf(state.model)
        self._family = family_of(hf, key=f"{self.name}: model family")
        self._original = _rope_snapshot(hf.config, self._family)
        try:
            self.check_model_config(hf.config, self._family, self._original)
        except ConfigError as err:
            raise ConfigError(f"{self.name}: {err.key}", err.value, err.allowed) from None
        install_replay_hook(state)
        self._default_save_folder(state)

    def _default_save_folder(self, state: State) -> None:
        """No save_folder of its own: the Trainer's (its checkpoint saver's local folder); neither: say so once."""
        if self.save_folder is not None:
            return
        from composer.callbacks import CheckpointSaver

        saver = next((c for c in state.callbacks if isinstance(c, CheckpointSaver)), None)
        if saver is not None and getattr(saver, "folder", None):
            self.save_folder = str(saver.folder)
        elif self.save_checkpoints or self.export_hf:
            text = (f"{self.name}: no save_folder (neither its own nor the Trainer's): phase checkpoints and HF "
                    "exports are off")
            log.warning(text)
            self._warn_once(text)

    def replay(self, state: State, saved: dict[str, Any]) -> None:
        """Called before a checkpoint's weights load: the model takes its saved phase's rope config."""
        if not self.enabled:
            return
        if saved.get("original") is not None:
            self._original = copy.deepcopy(saved["original"])
        self._configure(state.model, int(saved.get("phase", 0)))

    def _after_load(self, state: State, logger: Logger) -> None:
        """Put the model in the rope config of its phase (a resumed one's, or the first) and build data."""
        self._configure(state.model, self._phase)
        self._prepare_datasets(state)

    def _fit_start(self, state: State, logger: Logger) -> None:
        if state.max_duration is not None:
            if self._recipe:  # validate_run already checked the recipe; the schedule needs the run's length
                self._schedule(state.max_duration)
            else:
                self.validate_run(RunFacts.from_state(state))
        mb = state.device_train_microbatch_size
        if self._base_mb is None and isinstance(mb, int) and not state.auto_microbatching:
            self._base_mb = mb
        loader = state.train_dataloader
        # The length of the Trainer's data comes from the recipe's manifest, a resumed state, or the
        # first batch (_after_dataloader): never from reading the dataset here, so a fresh and a
        # resumed run draw the same data and random numbers.
        if self._base_len is None and self._recipe.get("manifest"):
            self._base_len = self._recipe.get("base_len")
        self._base_rows = getattr(loader, "batch_size", None)
        self._check_base_tokens()
        if any(p.lr_multiplier != 1.0 for p in self.phases):
            self._check_schedulers(state)
        check_progress_known(state, {f"phases[{p.index}].duration": p.duration for p in self.phases
                                     if p.duration is not None}, within=False)
        if self._uses_datasets():
            if state.max_duration is not None and state.max_duration.unit == TimeUnit.EPOCH:
                raise ConfigError("max_duration", str(state.max_duration),
                                  "in ba, tok or sp when phases switch datasets")
            if self._tokens is None and self.phase.dataset is not None:
                raise ConfigError("tokens_per_step", None,
                                  f"needed when phase '{self.phase.name}' starts the run on its own dataset and "
                                  "the length of the Trainer's data is unknown (no recipe manifest)")
            if self._loader is None:  # a second fit() keeps the sources where they are
                base = _Source(BASE, loader)
                base.resume = self._resume_sources.pop(BASE, None)
                self._sources = {BASE: base}
                self._loader = _PhasedLoader(self)
            state.set_dataloader(self._loader, state.dataloader_label or "train")
            state.dataset_resumption["train"] = True  # positions are ours: no spinning by the Trainer
            self._current_source = self._source_key(state, self.phase)
        self._log_schedule(state, logger)

    def _before_dataloader(self, state: State, logger: Logger) -> None:
        target = self._phase_at(state)
        if target != self._phase:
            self._transition(state, logger, target)
        if self._loader is not None:
            self._current_source = self._source_key(state, self.phase)

    #: sets the phase's length before any warmup acts inside the phase (see algorithms.order)
    length_rank = 0

    def set_batch_length(self, state: State, logger: Logger) -> None:
        batch = state.batch
        if not isinstance(batch, Mapping):
            raise ValueError(f"ContextLengthSchedule needs a mapping batch of [batch, seq] tensors, "
                             f"got {type(batch).__name__}")
        phase = self.phase
        full = batch_seq_length(batch)
        if self._base_len is None and self._current_source == BASE:
            self._base_len = full
            self._check_base_tokens()
        if full < phase.seq_length:
            raise ValueError(f"ContextLengthSchedule: phase '{phase.name}' trains at {phase.seq_length} tokens but "
                             f"its batches hold {full}-token sequences; give the phase a dataset prepared at "
                             f">= {phase.seq_length} tokens")
        self._batch_cut = full > phase.seq_length
        if self._batch_cut:  # a batch at its phase's length is not counted again
            before = batch_tokens(batch)
            state.batch = set_batch_sequence_length(batch, phase.seq_length, self.mode)
            self._token_excess = before - batch_tokens(state.batch)
        mb = self._microbatch(phase)
        if mb is not None:
            state.device_train_microbatch_size = mb

    def _batch_start(self, state: State, logger: Logger) -> None:
        mult = self.phase.lr_multiplier
        self._lr_saved = None
        if mult == 1.0:
            return
        self._lr_saved = [g["lr"] for opt in ensure_tuple(state.optimizers) for g in opt.param_groups]
        self._sched_steps = [int(getattr(s, "last_epoch", 0)) for s in state.schedulers]
        for opt in ensure_tuple(state.optimizers):
            for group in opt.param_groups:
                group["lr"] = group["lr"] * mult

    def _batch_end(self, state: State, logger: Logger) -> None:
        # Composer counted the batch before it was cut: count what was trained instead.
        # (_batch_cut is the same on every rank: all train the same phase from the same source)
        uncount_tokens(state, self._token_excess, reduce=self._batch_cut)
        self._token_excess, self._batch_cut = 0, False
        if self._lr_saved is not None:
            stepped = [int(getattr(s, "last_epoch", 0)) for s in state.schedulers] != self._sched_steps
            if not stepped:  # nothing reset the lr this batch: put the scheduled value back
                groups = [g for opt in ensure_tuple(state.optimizers) for g in opt.param_groups]
                for group, lr in zip(groups, self._lr_saved):
                    group["lr"] = lr
            self._lr_saved = None
        prev = state.previous_timestamp
        metrics = {"context/seq_len": self.phase.seq_length, "context/phase": self._phase}
        if prev is not None:
            metrics["context/tokens_per_step"] = int(state.timestamp.token) - int(prev.token)
        logger.log_metrics(metrics)

    def _batch_checkpoint(self, state: State, logger: Logger) -> None:
        done = state.max_duration is not None and state.timestamp >= state.max_duration
        nxt = self._phase_at(state)
        if (nxt != self._phase or done) and self.phase.name not in self._exported:
            self._phase_end(state, logger)

    def _fit_end(self, state: State, logger: Logger) -> None:
        if self._tmp_tokenizer is not None and os.path.isdir(self._tmp_tokenizer):
            import shutil

            shutil.rmtree(self._tmp_tokenizer, ignore_errors=True)
            self._tmp_tokenizer = None

    # ------------------------------------------------------------------ transitions

    def configure_model(self, model: torch.nn.Module, phase: int | str) -> dict[str, Any] | None:
        """Give ``model`` the rope config of ``phase`` (index or name): what a transition does to the model.

        The model's own rope (as built, before any phase) is recorded on first use and is what
        ``rope_scaling: null`` means. Returns :func:`apply_rope_scaling`'s report (None: no RoPE).
        """
        index = phase if isinstance(phase, int) else [p.name for p in self.phases].index(phase)
        return self._configure(model, index)

    def _configure(self, model: torch.nn.Module, index: int) -> dict[str, Any] | None:
        hf = unwrap_hf(model)
        family = self._family or family_of(hf, key="model")
        self._family = family
        if self._original is None:
            self._original = _rope_snapshot(hf.config, family)
        target = _rope_target(self.phases[index], self._original, family, hf.config)
        if target.kind != "rope":
            return None
        return apply_rope_scaling(hf, target.scaling, max_position_embeddings=target.max_positions,
                                  key=f"phases[{index}].rope_scaling")

    def _transition(self, state: State, logger: Logger, new: int) -> None:
        old = self._phase
        before, after = self.phases[old], self.phases[new]
        report = self._configure(state.model, new)
        self._phase = new
        hf = unwrap_hf(state.model)
        target = _rope_target(after, self._original, self._family, hf.config)
        reach = target.reach
        metrics = {
            "context/phase": new, "context/seq_len": after.seq_length, "context/prev_seq_len": before.seq_length,
            "context/max_positions": target.max_positions,
            "context/addressable_positions": -1 if math.isinf(reach) else int(reach),
            "context/lr_multiplier": after.lr_multiplier, "rope/factor": target.factor,
        }
        if target.theta is not None:
            metrics["rope/theta"] = target.theta
        mb = self._microbatch(after)
        if mb is not None:
            metrics["context/microbatch_size"] = mb
        logger.log_metrics(metrics)
        old_max = report["old_max_positions"] if report else target.max_positions
        text = (f"context_length_schedule: phase '{after.name}' at {state.timestamp.batch}: seq_len "
                f"{before.seq_length} -> {after.seq_length}; {_describe(target)}; max positions "
                f"{old_max} -> {target.max_positions} (addressable {reach:g})"
                + (f"; lr x{after.lr_multiplier:g}" if after.lr_multiplier != 1.0 else ""))
        logger.log_traces({"context/transition": text})
        log.info(text)
        if self.verbose and dist.get_global_rank() == 0:
            print(text, flush=True)
        self._events.append({"batch": int(state.timestamp.batch), "name": self.name,
                             "text": text.split(": ", 1)[1]})
        if new > old + 1:
            self._warn_once(f"ContextLengthSchedule: phases {', '.join(p.name for p in self.phases[old + 1:new])} "
                            "end within one batch and are skipped")

    def _check_base_tokens(self) -> None:
        """Tokens per step from the Trainer's batches once their length is known; tokens_per_step must agree."""
        rows = self._base_rows
        if self._tokens is None:
            self._tokens = self.tokens_per_step or (rows * self._base_len * dist.get_world_size()
                                                    if rows and self._base_len else None)
        if self.tokens_per_step and rows and self._base_len and any(p.dataset is None for p in self.phases):
            base_tokens = rows * self._base_len * dist.get_world_size()
            if base_tokens != self.tokens_per_step:
                raise ConfigError("tokens_per_step", self.tokens_per_step,
                                  f"phases without a dataset train on the Trainer's batches of {base_tokens} tokens")

    def _microbatch(self, phase: Phase) -> int | None:
        if phase.microbatch_size is not None:
            return phase.microbatch_size
        if self._base_mb is None or self._base_len is None:
            return None
        return max(1, self._base_mb * self._base_len // phase.seq_length)

    def _check_schedulers(self, state: State) -> None:
        from torch.optim.lr_scheduler import LambdaLR

        for s in state.schedulers:
            if not isinstance(s, LambdaLR):
                raise ValueError(f"ContextLengthSchedule: lr_multiplier composes with Composer schedulers (LambdaLR) "
                                 f"or none; {type(s).__name__} computes each lr from the last one")

    # ------------------------------------------------------------------ data

    def _prepare_datasets(self, state: State) -> None:
        """Build missing phase datasets from their prepare blocks (local rank 0 builds, the rest wait)."""
        from composer_growth.data.prepare import prepare_dataset, read_manifest

        todo = {path: users for path, users in self._dataset_paths().items() if read_manifest(path) is None}
        # every rank must agree on whether to wait: one rank may look after another has finished building
        flag = state.device.tensor_to_device(torch.tensor([len(todo)], dtype=torch.int64))
        dist.all_reduce(flag, reduce_operation="MAX")
        if int(flag.item()) == 0:
            return
        plans = {}
        for path, users in todo.items():
            options = self._prepare_options(path, users)
            if options is None:
                raise ConfigError(f"phases[{users[0].index}].dataset", path,
                                  "no dataset there (no manifest.json) and no prepare block to build it")
            named = any("tokenizer" in (p.prepare or {}) for p in users)
            if not named and (not options.get("tokenizer") or not os.path.exists(str(options["tokenizer"]))):
                options["tokenizer"] = self._model_tokenizer_dir(state)  # no recipe: the model's own
            plans[path] = {k: v for k, v in options.items() if v is not None or k == "tokenizer"}
        if dist.get_local_rank() == 0:
            for path, options in plans.items():
                if read_manifest(path) is not None:
                    continue
                if options.get("tokenizer") is not None:
                    options.pop("vocab_size", None)
                prepare_dataset(path, **options)
        dist.barrier()

    def _model_tokenizer_dir(self, state: State) -> str | None:
        tokenizer = getattr(unwrap_composer(state.model), "tokenizer", None)
        if tokenizer is None:
            return None
        if self._tmp_tokenizer is None:
            self._tmp_tokenizer = tempfile.mkdtemp(prefix="ctx-tokenizer-")
            if dist.get_local_rank() == 0:
                tokenizer.save_pretrained(self._tmp_tokenizer)
        return self._tmp_tokenizer

    def _source_key(self, state: State, phase: Phase) -> str:
        """The source of a phase's batches, built on first use."""
        if phase.dataset is None:
            return BASE
        if phase.name in self._phase_sources:
            return self._phase_sources[phase.name]
        from composer_growth.data.loaders import build_lm_dataloader
        from composer_growth.data.prepare import read_manifest

        manifest = read_manifest(phase.dataset)
        if manifest is None:
            raise ValueError(f"ContextLengthSchedule: phase '{phase.name}': no dataset at {phase.dataset}")
        rows = self._loader_rows(phase, int(manifest["seq_len"]), self._tokens, dist.get_world_size())
        key = f"{phase.dataset}@{rows}"
        if key not in self._sources:
            loader = build_lm_dataloader(phase.dataset, self.train_split, rows,
                                         shuffle=self._recipe.get("shuffle", self.shuffle), seed=state.rank_zero_seed,
                                         num_workers=self._recipe.get("num_workers", self.num_workers))
            source = _Source(key, loader)
            source.resume = self._resume_sources.pop(key, None)
            self._sources[key] = source
        self._phase_sources[phase.name] = key
        return key

    def _next_batch(self) -> Any:
        return self._sources[self._current_source].next()

    # ------------------------------------------------------------------ eval

    def _evaluator(self, state: State, label: str | None = None) -> Any:
        for ev in state.evaluators:
            if (label is None and ev.label in self.eval_labels) or ev.label == label:
                return ev
        return None

    def _eval_loader(self, state: State, phase: Phase) -> Any:
        """A loader over the eval split of a phase's dataset (None: the phase has none)."""
        if phase.dataset is None or not os.path.isdir(os.path.join(phase.dataset, self.eval_split)):
            return None
        from composer_growth.data.loaders import build_lm_dataloader
        from composer_growth.data.prepare import read_manifest

        if phase.dataset not in self._eval_loaders:
            manifest = read_manifest(phase.dataset)
            length = int(manifest["seq_len"]) if manifest else phase.seq_length
            ev = self._evaluator(state)
            base = ev.dataloader.dataloader if ev is not None else None
            rows = getattr(base, "batch_size", None) or 1
            eval_len = _sample_length(base) or self._base_len or length
            self._eval_loaders[phase.dataset] = build_lm_dataloader(
                phase.dataset, self.eval_split, max(1, rows * eval_len // length), shuffle=False,
                seed=state.rank_zero_seed, num_workers=0, drop_last=False)
        return self._eval_loaders[phase.dataset]

    def _eval_start(self, state: State, logger: Logger) -> None:
        label = state.dataloader_label
        self._eval_active = label in self.eval_labels
        if not self._eval_active:
            return
        loader = self._eval_loader(state, self.phase)
        if loader is None:
            return
        ev = self._evaluator(state, label)
        subset = getattr(ev, "subset_num_batches", None) if ev is not None else None
        current, whole = state.dataloader_len, _len(ev.dataloader.dataloader) if ev is not None else None
        if not (isinstance(subset, int) and subset > 0):
            subset = int(current) if current is not None and whole is not None and int(current) < whole else -1
        length = _len(loader)
        if subset > 0 and length is not None:
            subset = min(subset, length)
        state.set_dataloader(loader, label, subset)

    def _eval_batch_start(self, state: State, logger: Logger) -> None:
        if not self._eval_active or not isinstance(state.batch, Mapping):
            return
        seq = self.phase.seq_length
        full = batch_seq_length(state.batch)
        if full > seq:
            state.batch = set_batch_sequence_length(state.batch, seq, self.mode)
        elif full < seq:
            self._warn_once(f"ContextLengthSchedule: phase '{self.phase.name}' evaluates {full}-token sequences, "
                            f"shorter than its {seq}: give it a dataset with a '{self.eval_split}' split")

    def _eval_end(self, state: State, logger: Logger) -> None:
        if not self._eval_active:
            return
        self._eval_active = False
        metrics = state.eval_metrics.get(state.dataloader_label, {})
        metric = metrics.get("LanguageCrossEntropy")
        if metric is not None:
            loss = float(metric.compute())
            logger.log_metrics({f"context/ppl/{self.phase.seq_length}": math.exp(min(loss, 80.0)),
                                "context/eval_seq_len": self.phase.seq_length})

    @torch.no_grad()
    def _mean_loss(self, state: State, loader: Any, length: int) -> float | None:
        model = state.model
        composer_model = unwrap_composer(model)
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        try:
            iterator = iter(loader)
            for _ in range(self.eval_batches):
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                batch = set_batch_sequence_length(batch, length, self.mode)
                batch = state.device.batch_to_device(batch)
                with get_precision_context(state.precision, state.precision_config):
                    outputs = model(batch)
                    loss = composer_model.loss(outputs, batch)
                labels = batch.get("labels", batch["input_ids"])
                n = int((labels[:, 1:] != -100).sum())
                total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        finally:
            model.train(was_training)
        t = state.device.tensor_to_device(total)
        dist.all_reduce(t, reduce_operation="SUM")
        loss_sum, count = (float(x) for x in t.cpu())
        return loss_sum / count if count else None

    def _length_perplexities(self, state: State, logger: Logger) -> dict[int, float]:
        """Perplexity at every phase length up to the current one, on that phase's eval data."""
        out: dict[int, float] = {}
        if self.eval_batches <= 0:
            return out
        ev = self._evaluator(state)
        base = ev.dataloader.dataloader if ev is not None else None
        for phase in self.phases[:self._phase + 1]:
            loader = self._eval_loader(state, phase) or base
            if loader is None:
                continue
            loss = self._mean_loss(state, loader, phase.seq_length)
            if loss is not None:
                out[phase.seq_length] = math.exp(min(loss, 80.0))
        if out:
            logger.log_metrics({f"context/phase_end_ppl/{n}": v for n, v in out.items()})
        return out

    # ------------------------------------------------------------------ phase end

    def _phase_end(self, state: State, logger: Logger) -> None:
        from composer.utils import format_name_with_dist
        from composer.utils.checkpoint import save_checkpoint

        phase = self.phase
        ppl = self._length_perplexities(state, logger)
        self._exported.append(phase.name)  # before saving: the checkpoint records this phase as done
        if self.save_folder is None:
            return
        if "://" in self.save_folder:
            self._warn_once(f"ContextLengthSchedule: save_folder {self.save_folder} is remote; phase exports "
                            "are written to local folders only")
            return
        folder = os.path.join(format_name_with_dist(self.save_folder, state.run_name), phase.name)
        os.makedirs(folder, exist_ok=True)
        if self.save_checkpoints:
            save_checkpoint(state, os.path.join(folder, "checkpoint.pt"))
        if self.export_hf:
            full = gather_hf_state_dict(state.model) if state.fsdp_enabled else None  # all ranks, rank 0 keeps it
            if dist.get_global_rank() == 0:
                self._export_hf(state, folder, ppl, full)
        dist.barrier()
        logger.log_metrics({"context/exported_phase": phase.index})
        if self.verbose and dist.get_global_rank() == 0:
            print(f"context_length_schedule: phase '{phase.name}' done at {state.timestamp.batch}; "
                  f"saved {folder}" + (f"; perplexity {', '.join(f'{n}: {v:.2f}' for n, v in ppl.items())}"
                                       if ppl else ""), flush=True)

    def _export_hf(self, state: State, folder: str, ppl: dict[int, float], full: dict | None = None) -> None:
        import json

        hf = unwrap_hf(state.model)
        peft = _peft_model(state.model)
        if peft is None:  # adapters injected mid-run (lora_merge start_at, trunk: lora) are merged in
            save_pretrained(hf, folder, state_dict=full if full is not None else merged_state_dict(hf))
        elif state.fsdp_enabled:
            self._warn_once("ContextLengthSchedule: no HF export of LoRA adapters under FSDP (use the phase's "
                            "Composer checkpoint)")
            return
        else:
            if self.export_base_weights:
                hf.save_pretrained(folder, state_dict=_base_state_dict(hf))
            else:
                hf.config.save_pretrained(folder)
            _save_adapter(peft, os.path.join(folder, "adapter"))
            # and one plain model with every adapter folded in, which `from_pretrained` loads alone
            save_pretrained(hf, os.path.join(folder, "merged"), state_dict=merged_state_dict(hf))
        tokenizer = getattr(unwrap_composer(state.model), "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        phase = self.phase
        with open(os.path.join(folder, "phase.json"), "w") as f:
            json.dump({**phase.summary(), "index": phase.index, "batch": int(state.timestamp.batch),
                       "tokens": int(state.timestamp.token), "perplexity": {str(k): v for k, v in ppl.items()},
                       "max_addressable_positions": _finite(max_addressable_positions(hf.config)),
                       "lora": peft is not None}, f, indent=2)

    # ------------------------------------------------------------------ logging

    def _log_schedule(self, state: State, logger: Logger) -> None:
        hf = unwrap_hf(state.model)
        targets = [_rope_target(p, self._original, self._family, hf.config) for p in self.phases]
        params: dict[str, Any] = {"context/schedule": [p.summary() for p in self.phases],
                                  "context/num_phases": len(self.phases)}
        lines = [f"context_length_schedule: {len(self.phases)} phases ({self.mode}; "
                 f"{self._tokens or '?'} tokens per step)"]
        for p, t in zip(self.phases, targets):
            start = self._starts[p.index] if self._starts is not None else None
            for k, v in (("seq_length", p.seq_length), ("start", start), ("rope_type", _rope_type(t.scaling)),
                         ("rope_factor", t.factor), ("max_positions", t.max_positions),
                         ("lr_multiplier", p.lr_multiplier), ("dataset", p.dataset or BASE)):
                params[f"context/schedule/{p.name}/{k}"] = v
            lines.append(f"  {p.index}. {p.name:<12} {p.seq_length:>7} tokens from {start:g}{self._unit.value}"
                         f"  {_describe(t)}  max positions {t.max_positions}"
                         f"  lr x{p.lr_multiplier:g}  data {p.dataset or 'trainer'}"
                         + (f"  ({p.description})" if p.description else "")
                         if start is not None else f"  {p.index}. {p.name} {p.seq_length}")
        logger.log_hyperparameters(params)
        if self.verbose and dist.get_global_rank() == 0:
            print("\n".join(lines), flush=True)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        sources = {}
        for key, source in self._sources.items():
            saved = source.state_dict()
            if saved is not None:
                sources[key] = saved
        for key, saved in self._resume_sources.items():  # loaded, not used yet in this run
            sources.setdefault(key, saved)
        out = super().state_dict()  # Composer's base: {'repr': ...}
        out.update({"phase": self._phase, "original": copy.deepcopy(self._original), "exported": list(self._exported),
                    "base_len": self._base_len, "base_mb": self._base_mb, "tokens_per_step": self._tokens,
                    "sources": sources, "events": [dict(e) for e in self._events]})
        return out

    def run_events(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._events]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._phase = int(state.get("phase", 0))
        if state.get("original") is not None:
            self._original = copy.deepcopy(state["original"])
        self._exported = list(state.get("exported", []))
        self._base_len = state.get("base_len", self._base_len)
        self._base_mb = state.get("base_mb", self._base_mb)
        self._tokens = state.get("tokens_per_step", self._tokens)
        self._resume_sources = dict(state.get("sources", {}))
        self._events = [dict(e) for e in state.get("events", [])]


# --------------------------------------------------------------------------- helpers


def _len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x



def _peft_model(model: torch.nn.Module) -> Any:
    """The peft ``PeftModel`` inside Composer / DDP wrappers (None without LoRA)."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    for _ in range(6):
        if isinstance(model, PeftModel):
            return model
        nxt = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or getattr(model, "model", None)
        if not isinstance(nxt, torch.nn.Module):
            return None
        model = nxt
    return None


def _save_adapter(peft: Any, folder: str) -> None:
    """``peft.save_pretrained``; Composer leaves ``peft_type`` a plain string, which peft's model card needs
    as its enum (a ``str`` enum: Composer's ``== 'LORA'`` checks still hold)."""
    from peft import PeftType

    for config in peft.peft_config.values():
        if isinstance(config.peft_type, str) and not isinstance(config.peft_type, PeftType):
            config.peft_type = PeftType(config.peft_type.upper())
    peft.save_pretrained(folder)


def _base_state_dict(hf: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights from a LoRA-injected model: adapter tensors dropped, names restored."""
    out = {}
    for name, tensor in hf.state_dict().items():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out
