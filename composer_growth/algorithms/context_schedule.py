"""Context-length schedule: train in phases of growing sequence length, with RoPE scaling per phase.

A phase (:mod:`composer_growth.algorithms.phases`) says how long the sequences are, for how long,
how the model's rotary embedding is configured while it runs, and optionally where its data comes
from. At a phase start this Algorithm

* rebuilds the model's rope config and rotary buffers through transformers' own rope init
  (:func:`~composer_growth.functional.rope.apply_rope_scaling`, with the phase's
  :func:`~composer_growth.functional.rope.rope_target`);
* gives the batches the phase's length: longer data is cut with the batch op of the sequence-length
  warmup (``reshape`` keeps every token, ``truncate`` drops each row's tail); a phase that names a
  ``dataset`` trains on data prepared at (at least) its length, so nothing is ever padded;
* keeps tokens per optimizer step constant (the loader rows and the microbatch rows follow the
  length) unless the phase sets ``global_batch_size``, and scales the learning rate by the phase's
  ``lr_multiplier`` on top of the recipe's scheduler.

When some phase names a dataset, the Trainer gets one endless loader over the current phase's source
(:mod:`composer_growth.data.phased`), whose positions this Algorithm saves. Evaluation at the phase's
length and the phase-end export (checkpoint, HF export, perplexity at every length so far) are the
callbacks of :mod:`composer_growth.phase_callbacks`, which the Algorithm adds to the Trainer at INIT.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist, ensure_tuple

from composer_growth.algorithms.base import SuiteAlgorithm
from composer_growth.algorithms.order import set_batch_lengths
from composer_growth.algorithms.phase_data import PhaseDatasets
from composer_growth.algorithms.phases import Phase, Timeline, parse_phases
from composer_growth.algorithms.composer_hooks import install_replay_hook
from composer_growth.algorithms.lr import set_lr_multiplier
from composer_growth.data.phased import BASE, Sources
from composer_growth.errors import ConfigError, check, check_flag, check_int
from composer_growth.families import FAMILIES, Family, family_of
from composer_growth.functional.batch import MODES, batch_seq_length, batch_tokens, set_batch_sequence_length
from composer_growth.functional.rope import RopeTarget, apply_rope_scaling, rope_snapshot
from composer_growth.phase_callbacks import PhaseExport, PhaseLengthEval
from composer_growth.registry import register_algorithm
from composer_growth.runfacts import RunFacts
from composer_growth.timeutil import check_progress_known, elapsed, run_over, uncount_tokens
from composer_growth.unwrap import unwrap_hf

log = logging.getLogger(__name__)


@register_algorithm("context_length_schedule")
class ContextLengthSchedule(PhaseDatasets, SuiteAlgorithm):
    """Extend a model's context in phases of growing sequence length, each with its own RoPE config.

    Its :attr:`callbacks` (:class:`~composer_growth.phase_callbacks.PhaseLengthEval`, evaluation at the
    phase's length; :class:`~composer_growth.phase_callbacks.PhaseExport`, the phase-end checkpoint and
    export) join the Trainer's callbacks at ``Event.INIT``; they read :attr:`phase`.

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
        check_flag(enabled, "enabled")
        self.phases = parse_phases(phases)
        check(mode in MODES, "mode", mode, f"one of {', '.join(MODES)}")
        check(save_folder is None or isinstance(save_folder, str), "save_folder", save_folder, "null or a folder")
        if tokens_per_step is not None:
            check_int(tokens_per_step, "tokens_per_step", minimum=1)
        check_int(eval_batches, "eval_batches", minimum=0)
        check_int(num_workers, "num_workers", minimum=0)
        self.enabled, self.save_folder, self.mode, self.tokens_per_step = enabled, save_folder, mode, tokens_per_step
        self.save_checkpoints, self.export_hf, self.export_base_weights = save_checkpoints, export_hf, export_base_weights
        self.eval_batches, self.eval_labels = eval_batches, tuple(ensure_tuple(eval_labels))
        self.train_split, self.eval_split = train_split, eval_split
        self.shuffle, self.num_workers, self.verbose = shuffle, num_workers, verbose
        self._warned: set[str] = set()
        self._timeline = Timeline(self.phases, self.warn_once)
        self._schedule(None)  # unit checks that need no max_duration
        # what a recipe tells us (validate_run); read again when the Trainer starts
        self._recipe: dict[str, Any] = {}
        # run state (saved: phase, original, exported, base_len, base_mb, tokens, sources, events)
        self._phase = 0
        self._original: dict[str, Any] | None = None
        self._family: Family | None = None
        self._exported: list[str] = []
        self._base_len: int | None = None
        self._base_mb: int | None = None
        self._mb_phase: int | None = None  # the phase whose microbatch size was last set
        self._tokens: int | None = None  # tokens per optimizer step, all ranks
        self._banner_due = False  # the schedule's block is printed once per fit, once tokens per step are known
        self._base_rows: int | None = None  # rows per batch of the Trainer's loader on this rank
        self._sources = Sources()
        self._phase_sources: dict[str, str] = {}
        self._loader: Any = None
        self._token_excess = 0
        self._batch_cut = False
        self._changes: list[dict[str, Any]] = []  # phase changes, for the run summary
        self._tmp_tokenizer: str | None = None
        self._data_lengths: dict[str, int] = {}  # tokens per row of each phase dataset (validate_run)
        evaluation = PhaseLengthEval(self)
        self.callbacks = (evaluation, PhaseExport(self, evaluation))

    # ------------------------------------------------------------------ schedule

    @property
    def phase(self) -> Phase:
        """The phase the model is configured for (the one of the last trained batch)."""
        return self.phases[self._phase]

    @property
    def trained_phases(self) -> list[Phase]:
        """The phases trained so far, the current one included."""
        return self.phases[:self._phase + 1]

    @property
    def data_length(self) -> int | None:
        """The sequence length of the Trainer's own train data (None until known)."""
        return self._base_len

    def phase_ending(self, state: State) -> bool:
        """Whether the current phase ends with this batch (the next one is in another phase, or the run is
        over) and has not been exported yet."""
        if self.phase.name in self._exported:
            return False
        if self._phase < len(self.phases) - 1:  # a later phase exists: it ends when the next one starts
            return self._phase_at(state) != self._phase
        return run_over(state)

    def mark_exported(self, name: str) -> None:
        self._exported.append(name)

    def warn_once(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            warnings.warn(text)

    def _schedule(self, max_duration: Time | None) -> bool:
        """Place the phases on the run (:meth:`Timeline.place`)."""
        return self._timeline.place(max_duration)

    @property
    def _unit(self) -> TimeUnit | None:
        return self._timeline.unit

    @property
    def _starts(self) -> list[float] | None:
        return self._timeline.starts

    def _phase_at(self, state: State) -> int:
        if self._starts is None and not self._schedule(state.max_duration):
            return self._phase
        if self._phase == len(self.phases) - 1:  # the last phase: nothing comes after it
            return self._phase
        done = elapsed(state, self._unit)
        if done < self._timeline.next_start(self._phase):  # no phase change due: the usual batch
            return self._phase
        return max(self.phase_index(lambda unit: done), self._phase)

    def phase_index(self, now) -> int:
        """The phase a batch trains in when the run has done ``now(unit)`` of each unit (after ``_schedule``)."""
        return self._timeline.index(now)

    def plan_length(self, now, length: int) -> int:
        """``composer-growth plan``: the length a batch trains at in the phase of ``now``."""
        return self.phases[self.phase_index(now)].seq_length

    def plan_rope(self, index: int, config: Any) -> dict[str, Any]:
        """``composer-growth plan``: the positions of phase ``index`` on a model with ``config`` (as built)."""
        family = family_of(getattr(config, "model_type", None), key="model")
        target = self.phases[index].rope(rope_snapshot(config, family), family, config)
        if target.kind == "alibi":
            return {"rope_type": "alibi", "rope_factor": None, "positions": "ALiBi: no scaling needed"}
        if target.kind != "rope":
            return {"rope_type": target.kind, "rope_factor": None, "positions": target.describe()}
        return {"rope_type": target.rope_type, "rope_factor": target.factor, "positions": target.describe()}

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
        config = facts.model_config
        if config is not None and facts.origin in ("recipe", "foundry"):  # at INIT from the model itself
            family = FAMILIES.get(getattr(config, "model_type", None))
            if family is not None:
                self.check_model_config(config, family)
        if facts.has_recipe:
            self._check_data()

    def check_model_config(self, config: Any, family: Family | None = None,
                           original: dict[str, Any] | None = None) -> list[RopeTarget]:
        """Each phase's rope config on this model; ConfigError for a length its positions cannot address."""
        family = family or family_of(config, key="model")
        original = original or rope_snapshot(config, family)
        targets = []
        for phase in self.phases:
            target = phase.rope(original, family, config)
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
                               f"{target.describe()}, {family.max_positions_key}={target.max_positions}); "
                               "give the phase a rope_scaling that reaches it")
                raise ConfigError(f"phases[{phase.index}].seq_length", phase.seq_length, allowed)
            targets.append(target)
        return targets

    # ------------------------------------------------------------------ events

    # A frozenset: Composer asks every algorithm about every event, and a tuple compares with Event's
    # slow __eq__ once per member; a set hashes once.
    _EVENTS = frozenset((Event.INIT, Event.AFTER_LOAD, Event.FIT_START, Event.BEFORE_DATALOADER,
                         Event.AFTER_DATALOADER, Event.BATCH_START, Event.BATCH_END, Event.FIT_END))

    def match(self, event: Event, state: State) -> bool:
        return self.enabled and event in self._EVENTS

    #: the method each event runs (names: one table for the class, not a dict built per call)
    _HANDLERS = {Event.INIT: "_init", Event.AFTER_LOAD: "_after_load", Event.FIT_START: "_fit_start",
                 Event.BEFORE_DATALOADER: "_before_dataloader", Event.AFTER_DATALOADER: "_after_dataloader",
                 Event.BATCH_START: "_batch_start", Event.BATCH_END: "_batch_end", Event.FIT_END: "_fit_end"}

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        getattr(self, self._HANDLERS[event])(state, logger)

    def _after_dataloader(self, state: State, logger: Logger) -> None:
        set_batch_lengths(self, state, logger)

    def _init(self, state: State, logger: Logger) -> None:
        hf = unwrap_hf(state.model)
        self._family = family_of(hf, key=f"{self.name}: model family")
        self._original = rope_snapshot(hf.config, self._family)
        try:
            self.check_model_config(hf.config, self._family, self._original)
        except ConfigError as err:
            raise ConfigError(f"{self.name}: {err.key}", err.value, err.allowed) from None
        install_replay_hook(state)
        self._default_save_folder(state)
        self._add_callbacks(state)

    def _add_callbacks(self, state: State) -> None:
        """Put the eval and export callbacks into the Trainer's, before its checkpoint saver (at a phase
        end the export marks the phase done before any checkpoint of that batch is written)."""
        from composer.callbacks import CheckpointSaver

        mine = [c for c in self.callbacks if not any(c is listed for listed in state.callbacks)]
        at = next((i for i, c in enumerate(state.callbacks) if isinstance(c, CheckpointSaver)), len(state.callbacks))
        state.callbacks[at:at] = mine

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
            self.warn_once(text)

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
        # first batch (set_batch_length): never from reading the dataset here, so a fresh and a
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
                self._sources.add(BASE, lambda: loader)
                self._loader = self._sources.loader()
            state.set_dataloader(self._loader, state.dataloader_label or "train")
            state.dataset_resumption["train"] = True  # positions are ours: no spinning by the Trainer
            self._sources.current = self._source_key(state, self.phase)
        self._banner_due = True
        if self._tokens is not None:  # else at the first batch, whose length gives the tokens per step
            self._log_schedule(state, logger)

    def _before_dataloader(self, state: State, logger: Logger) -> None:
        target = self._phase_at(state)
        if target != self._phase:
            self._transition(state, logger, target)
        if self._loader is not None:
            self._sources.current = self._source_key(state, self.phase)

    #: sets the phase's length before any warmup acts inside the phase (see algorithms.order)
    length_rank = 0

    @property
    def truncates(self) -> bool:
        return self.mode == "truncate"

    def set_batch_length(self, state: State, logger: Logger) -> None:
        batch = state.batch
        if not isinstance(batch, Mapping):
            raise ValueError(f"ContextLengthSchedule needs a mapping batch of [batch, seq] tensors, "
                             f"got {type(batch).__name__}")
        phase = self.phase
        full = batch_seq_length(batch)
        if self._base_len is None and self._sources.current == BASE:
            self._base_len = full
            self._check_base_tokens()
        if self._banner_due:
            self._log_schedule(state, logger)
        if full < phase.seq_length:
            raise ValueError(f"ContextLengthSchedule: phase '{phase.name}' trains at {phase.seq_length} tokens but "
                             f"its batches hold {full}-token sequences; give the phase a dataset prepared at "
                             f">= {phase.seq_length} tokens")
        self._batch_cut = full > phase.seq_length
        if self._batch_cut:  # a batch at its phase's length is not counted again
            before = batch_tokens(batch)
            state.batch = set_batch_sequence_length(batch, phase.seq_length, self.mode)
            self._token_excess = before - batch_tokens(state.batch)
        if self._mb_phase != phase.index:
            # once per phase (at its first batch): Composer's auto microbatching may lower it from
            # there after an OOM, and setting it again every batch would undo that
            self._mb_phase = phase.index
            mb = self._microbatch(phase)
            if mb is not None:
                state.device_train_microbatch_size = mb

    def _batch_start(self, state: State, logger: Logger) -> None:
        set_lr_multiplier(state, self.name, self.phase.lr_multiplier)  # the batch trains at the phase's lr

    def _batch_end(self, state: State, logger: Logger) -> None:
        # Composer counted the batch before it was cut: count what was trained instead.
        # (_batch_cut is the same on every rank: all train the same phase from the same source)
        uncount_tokens(state, self._token_excess, reduce=self._batch_cut)
        self._token_excess, self._batch_cut = 0, False
        set_lr_multiplier(state, self.name, 1.0)  # between batches (and in checkpoints) the scheduled lr
        prev = state.previous_timestamp
        metrics = {"context/seq_len": self.phase.seq_length, "context/phase": self._phase}
        if prev is not None:
            metrics["context/tokens_per_step"] = int(state.timestamp.token) - int(prev.token)
        logger.log_metrics(metrics)

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
            self._original = rope_snapshot(hf.config, family)
        target = self.phases[index].rope(self._original, family, hf.config)
        if target.kind != "rope":
            return None
        return apply_rope_scaling(hf, target.scaling, max_position_embeddings=target.max_positions,
                                  key=f"phases[{index}].rope_scaling")

    def _transition(self, state: State, logger: Logger, new: int) -> None:
        old = self._phase
        before, after = self.phases[old], self.phases[new]
        report = self._configure(state.model, new)
        self._phase = new
        target = after.rope(self._original, self._family, unwrap_hf(state.model).config)
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
                f"{before.seq_length} -> {after.seq_length}; {target.describe()}; max positions "
                f"{old_max} -> {target.max_positions} (addressable {reach:g})"
                + (f"; lr x{after.lr_multiplier:g}" if after.lr_multiplier != 1.0 else ""))
        logger.log_traces({"context/transition": text})
        log.info(text)
        if self.verbose and dist.get_global_rank() == 0:
            print(text, flush=True)
        self._changes.append({"batch": int(state.timestamp.batch), "name": self.name,
                             "text": text.split(": ", 1)[1]})
        if new > old + 1:
            self.warn_once(f"ContextLengthSchedule: phases {', '.join(p.name for p in self.phases[old + 1:new])} "
                           "end within one batch and are skipped")

    def _check_base_tokens(self) -> None:
        """Tokens per step from the Trainer's batches once their length is known; tokens_per_step must agree."""
        rows = self._base_rows
        if self._tokens is None:
            self._tokens = self._step_tokens(rows, self._base_len, dist.get_world_size())
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

    # ------------------------------------------------------------------ logging

    def _log_schedule(self, state: State, logger: Logger) -> None:
        self._banner_due = False
        hf = unwrap_hf(state.model)
        targets = [p.rope(self._original, self._family, hf.config) for p in self.phases]
        params: dict[str, Any] = {"context/schedule": [p.summary() for p in self.phases],
                                  "context/num_phases": len(self.phases)}
        tokens = f"{self._tokens} tokens per step" if self._tokens else "tokens per step unknown: the loader has no batch_size"
        lines = [f"context_length_schedule: {len(self.phases)} phases ({self.mode}; {tokens})"]
        for p, t in zip(self.phases, targets):
            start = self._starts[p.index] if self._starts is not None else None
            for k, v in (("seq_length", p.seq_length), ("start", start), ("rope_type", t.rope_type),
                         ("rope_factor", t.factor), ("max_positions", t.max_positions),
                         ("lr_multiplier", p.lr_multiplier), ("dataset", p.dataset or BASE)):
                params[f"context/schedule/{p.name}/{k}"] = v
            lines.append(f"  {p.index}. {p.name:<12} {p.seq_length:>7} tokens from {start:g}{self._unit.value}"
                         f"  {t.describe()}  max positions {t.max_positions}"
                         f"  lr x{p.lr_multiplier:g}  data {p.dataset or 'trainer'}"
                         + (f"  ({p.description})" if p.description else "")
                         if start is not None else f"  {p.index}. {p.name} {p.seq_length}")
        logger.log_hyperparameters(params)
        if self.verbose and dist.get_global_rank() == 0:
            print("\n".join(lines), flush=True)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()  # Composer's base: {'repr': ...}
        out.update({"phase": self._phase, "original": copy.deepcopy(self._original), "exported": list(self._exported),
                    "base_len": self._base_len, "base_mb": self._base_mb, "tokens_per_step": self._tokens,
                    "sources": self._sources.state_dict(), "events": [dict(e) for e in self._changes]})
        return out

    def run_events(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._changes]

    def restore(self, state: dict[str, Any]) -> None:
        self._phase = int(state.get("phase", 0))
        if state.get("original") is not None:
            self._original = copy.deepcopy(state["original"])
        self._exported = list(state.get("exported", []))
        self._base_len = state.get("base_len", self._base_len)
        self._base_mb = state.get("base_mb", self._base_mb)
        self._tokens = state.get("tokens_per_step", self._tokens)
        self._sources.load_state_dict(state.get("sources", {}))
        self._changes = [dict(e) for e in state.get("events", [])]
