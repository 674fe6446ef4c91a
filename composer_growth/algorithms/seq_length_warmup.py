"""Sequence-length warmup: train on short sequences first, growing to full length.

The batch op lives in :mod:`composer_growth.functional.batch`; this Algorithm decides the
length from the run's progress, keeps Composer's token count equal to the tokens trained,
sizes reshaped microbatches by ``microbatch_policy``, and pre-allocates memory once at the
longest length without drawing data or random numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from composer_growth.algorithms.base import SuiteAlgorithm
from composer_growth.algorithms.compiling import make_static, raise_recompile_limit
from composer_growth.algorithms.order import set_batch_lengths
from composer_growth.errors import ConfigError, check, check_flag, check_int, check_number
from composer_growth.events import announce
from composer_growth.functional.batch import (MODES, batch_seq_length, batch_tokens, select_rows,
                                              set_batch_sequence_length)
from composer_growth.functional.loss import batch_loss
from composer_growth.registry import register_algorithm
from composer_growth.runfacts import RunFacts, check_at_fit_start
from composer_growth.timeutil import (check_progress_known, elapsed, parse_time, to_duration_fraction,
                                      uncount_tokens)
from composer_growth.unwrap import unwrap_composer

SCHEDULES = ("linear", "root")
MICROBATCH_POLICIES = ("tokens", "rows", "bounded")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a CUDA out-of-memory error: torch's ``OutOfMemoryError``, or a plain
    ``RuntimeError`` with CUDA's out-of-memory text (as Composer's ``_is_cuda_oom`` tells them)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("CUDA out of memory", "CUDA error: out of memory"))


def any_rank(state: State, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (collective: every rank calls it)."""
    if dist.get_world_size() == 1:
        return flag
    t = state.device.tensor_to_device(torch.tensor([int(flag)]))
    dist.all_reduce(t, reduce_operation="MAX")
    return bool(t.item())


def _warmup_length(p: float, min_len: int, max_len: int, step: int, schedule: str, degree: float) -> int:
    """Length at share ``p`` of the warmup (DeepSpeed's fixed_linear / fixed_root, rounded down to ``step``)."""
    if p >= 1.0:
        return max_len
    frac = p if schedule == "linear" else p ** (1.0 / degree)
    length = min_len + math.floor(frac * (max_len - min_len) / step) * step
    return max(min_len, min(max_len, length))


@register_algorithm("seq_length_warmup")
class SeqLengthWarmup(SuiteAlgorithm):
    """Grow the training sequence length from ``min_seq_length`` to ``max_seq_length``.

    Args:
        min_seq_length: length at the start.
        max_seq_length: length once the warmup is over.
        step_size: lengths move in multiples of this (a multiple of 8 suits tensor cores).
        duration: Composer time the warmup lasts (``"0.3dur"``, ``"2000ba"``, ``"5e7tok"``, ``"1ep"``,
            ``"10000sp"``); token durations count tokens actually trained.
        schedule: ``linear``, ``root`` (``root_degree``), or a list of ``[time, length]`` steps
            (``[[0, 64], ["0.1dur", 256], ["0.2dur", 1024]]``): the length of the last step reached.
        root_degree: the degree of the ``root`` schedule.
        mode: ``truncate`` (drop the tail of each row) or ``reshape`` (cut rows into more, shorter rows,
            keeping every token).
        microbatch_policy: reshape mode's rows per microbatch: ``rows`` (keep the Trainer's microbatch
            rows: more, shorter microbatches, as Composer's reshape), ``tokens`` (the default, the fastest
            measured on an idle CPU: raise the rows so tokens per microbatch stay constant) or ``bounded``
            (as ``tokens``, at most ``max_microbatch_scale`` times the Trainer's rows).
        max_microbatch_scale: the ``bounded`` policy's limit on rows per microbatch, as a multiple of
            the Trainer's microbatch size.
        preserve_end_of_sequence: in truncate mode, keep each row's last real token.
        preallocate: one forward and backward at ``max_seq_length`` before the first step.
        pad_token_id: fill for padded rows in reshape mode.
    """

    def __init__(self, min_seq_length: int = 64, max_seq_length: int = 1024, step_size: int = 64,
                 duration: Any = "0.3dur", schedule: Any = "linear", root_degree: float = 2.0,
                 mode: str = "truncate", preserve_end_of_sequence: bool = False, preallocate: bool = True,
                 pad_token_id: int = 0, microbatch_policy: str = "tokens", max_microbatch_scale: float = 2.0):
        check_int(min_seq_length, "min_seq_length", minimum=1, allowed="a positive integer")
        check_int(max_seq_length, "max_seq_length", minimum=min_seq_length,
                  allowed=f"an integer >= min_seq_length ({min_seq_length})")
        check_int(step_size, "step_size", minimum=1, allowed="a positive integer")
        check(mode in MODES, "mode", mode, f"one of {', '.join(MODES)}")
        check_number(root_degree, "root_degree", above=0)
        check_flag(preserve_end_of_sequence, "preserve_end_of_sequence")
        check_flag(preallocate, "preallocate")
        check_int(pad_token_id, "pad_token_id", minimum=0)
        check(microbatch_policy in MICROBATCH_POLICIES, "microbatch_policy", microbatch_policy,
              f"one of {', '.join(MICROBATCH_POLICIES)}")
        check_number(max_microbatch_scale, "max_microbatch_scale", minimum=1)
        self.microbatch_policy, self.max_microbatch_scale = microbatch_policy, float(max_microbatch_scale)
        self.min_seq_length, self.max_seq_length, self.step_size = min_seq_length, max_seq_length, step_size
        self.duration = parse_time(duration, "duration")
        self.mode, self.root_degree = mode, float(root_degree)
        self.preserve_end_of_sequence, self.preallocate = preserve_end_of_sequence, preallocate
        self.pad_token_id = pad_token_id
        self.steps: list[tuple[Time, int]] | None = None
        if isinstance(schedule, (list, tuple)):
            self.schedule = "steps"
            self.steps = self._parse_steps(schedule)
        else:
            check(schedule in SCHEDULES, "schedule", schedule, f"one of {', '.join(SCHEDULES)} or a list of [time, length]")
            self.schedule = schedule
        if step_size % 8:
            warnings.warn(f"SeqLengthWarmup: step_size={step_size} is not a multiple of 8; "
                          "lengths that are multiples of 8 run faster on tensor cores")
        # run state
        self.seq_len = min_seq_length
        self._base_microbatch: int | None = None
        self._set_microbatch: int | None = None
        self._token_excess = 0
        self._active = False
        self.over_batch: int | None = None  # batches done when the warmup ended (announced once)
        self._preallocated = False
        self.preallocation: str | None = None  # what the pre-allocation did: done, oom, auto (skipped)
        self._matched = self._EVENTS  # narrowed to FIT_START once the warmup is over
        self._logged_len: int | None = None
        self.run_facts: RunFacts | None = None  # what validate_run checked the options against

    def _parse_steps(self, schedule) -> list[tuple[Time, int]]:
        steps = []
        for i, item in enumerate(schedule):
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ConfigError(f"schedule[{i}]", item, "a [time, length] pair")
            t = Time(0, TimeUnit.DURATION) if item[0] in (0, "0") else parse_time(item[0], f"schedule[{i}][0]")
            length = item[1]
            check_int(length, f"schedule[{i}][1]", minimum=1, allowed="a positive integer length")
            steps.append((t, length))
        units = {t.unit for t, _ in steps if t.value != 0}
        check(len(units) <= 1, "schedule", schedule, "every step time in one unit")
        if units:
            unit = units.pop()
            steps = [(t if t.value else Time(0 if unit != TimeUnit.DURATION else 0.0, unit), n) for t, n in steps]
        times = [float(t.value) for t, _ in steps]
        check(times == sorted(times), "schedule", schedule, "step times in increasing order")
        lengths = [n for _, n in steps]
        check(lengths == sorted(lengths), "schedule", schedule, "lengths that do not decrease")
        check(lengths[-1] == self.max_seq_length, "schedule", schedule,
              f"a last step that reaches max_seq_length ({self.max_seq_length})")
        return steps

    @property
    def end(self) -> Time:
        """When the warmup is over."""
        return self.steps[-1][0] if self.steps is not None else self.duration

    # -- validation before training -----------------------------------------------------------
    def validate_run(self, facts: RunFacts) -> None:
        """Reject a warmup longer than the run, or longer than the data's sequences."""
        self.run_facts = facts
        end, max_duration = self.end, facts.max_duration
        frac = to_duration_fraction(end, max_duration, facts.batches_per_epoch)
        if frac is not None and frac > 1:
            key = "schedule" if self.steps is not None else "duration"
            raise ConfigError(key, str(end), f"must end within max_duration ({max_duration})")
        manifest = facts.manifest
        if manifest is not None and manifest["seq_len"] < self.max_seq_length:
            raise ConfigError("max_seq_length", self.max_seq_length,
                              f"at most the data's sequence length ({manifest['seq_len']} in {facts.data_path})")

    # -- schedule ---------------------------------------------------------------------------
    def _over(self, state: State) -> bool:
        return self.over_at(lambda unit: elapsed(state, unit))

    def over_at(self, now) -> bool:
        """Whether the warmup is over when the run has done ``now(unit)`` of each unit."""
        return now(self.end.unit) >= float(self.end.value)

    def length_at(self, state: State) -> int:
        return self.length_for(lambda unit: elapsed(state, unit))

    def length_for(self, now) -> int:
        """The warmup's length when the run has done ``now(unit)`` of each unit (a pure function of time)."""
        if self.steps is not None:
            length = self.steps[0][1]
            for t, n in self.steps:
                if t.value == 0 or now(t.unit) >= float(t.value):
                    length = n
            return length
        done = now(self.duration.unit)
        p = 1.0 if self.duration.value == 0 else done / float(self.duration.value)
        return _warmup_length(p, self.min_seq_length, self.max_seq_length, self.step_size, self.schedule,
                              self.root_degree)

    def plan_length(self, now, length: int) -> int:
        """``composer-growth plan``: the length a batch of ``length`` tokens trains at (see set_batch_length)."""
        return length if self.over_at(now) else min(length, self.length_for(now))

    # -- events -----------------------------------------------------------------------------
    # A frozenset: Composer asks every algorithm about every event, and a tuple compares with Event's
    # slow __eq__ once per member; a set hashes once.
    _EVENTS = frozenset((Event.FIT_START, Event.AFTER_DATALOADER, Event.BATCH_END))

    def match(self, event: Event, state: State) -> bool:
        return event in self._matched

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.FIT_START:
            self._matched = self._EVENTS
            check_at_fit_start(self, state)
            times = {"duration": self.duration} if self.steps is None else {
                f"schedule[{i}][0]": t for i, (t, _) in enumerate(self.steps)}
            check_progress_known(state, times, within=self.steps is None)
            mb = state.device_train_microbatch_size
            self._base_microbatch = mb if isinstance(mb, int) else None
            raise_recompile_limit(state, self.shape_count(state), "seq_length_warmup")
            if self.preallocate and state.auto_microbatching and not self._preallocated:
                # Composer starts 'auto' at the whole device batch: a pass at the longest length would
                # nearly always run out of memory. Its own OOM search sizes memory instead.
                self._preallocated, self.preallocation = True, "auto"
                if dist.get_global_rank() == 0:
                    print("seq_length_warmup: preallocate skipped: device_train_microbatch_size is auto "
                          "(Composer's microbatch search sizes memory)", flush=True)
        elif event is Event.AFTER_DATALOADER:
            set_batch_lengths(self, state, logger)
        elif event is Event.BATCH_END:
            self._batch_end(state, logger)

    #: runs after a context schedule's phase length is set, whatever the list order (see algorithms.order)
    length_rank = 1

    @property
    def truncates(self) -> bool:
        return self.mode == "truncate"

    def set_batch_length(self, state: State, logger: Logger) -> None:
        batch = state.batch
        if not isinstance(batch, Mapping):
            raise ValueError(f"SeqLengthWarmup needs a Mapping batch (dict, BatchEncoding, ...) with [batch, seq] "
                             f"tensors, got {type(batch).__name__}")
        if self.mode == "reshape" and "input_ids" not in batch:
            raise ValueError(f"SeqLengthWarmup(mode='reshape') needs batch['input_ids']; keys: {sorted(batch)}")
        full = batch_seq_length(batch)
        if full < self.max_seq_length:
            raise ValueError(f"SeqLengthWarmup: max_seq_length={self.max_seq_length} exceeds the batch's "
                             f"sequence length ({full})")
        if self.preallocate and not self._preallocated:
            self._preallocated = True
            if self.length_at(state) < self.max_seq_length:
                self._preallocate(state, batch)
        # Once the warmup is over batches pass through untouched, so the algorithm composes with
        # others that set the length later (e.g. a context-length schedule).
        was_active, self._active = self._active, not self._over(state)
        if was_active and not self._active:  # the lengths stop changing: compile the full length statically
            make_static(state, f"seq_length_warmup over at {self.max_seq_length} tokens")
        if not self._active and self.over_batch is None:  # once per run (saved), a resumed run included
            self.over_batch = int(state.timestamp.batch)
            announce(logger, "seq_length_warmup", self.over_batch, self._over_text())
        self.seq_len = self.length_at(state) if self._active else full
        if self.seq_len < full:  # batches at full length are not counted again
            before = batch_tokens(batch)
            state.batch = set_batch_sequence_length(batch, self.seq_len, self.mode, self.preserve_end_of_sequence,
                                                    self.pad_token_id)
            self._token_excess = before - batch_tokens(state.batch)
            if self.mode == "reshape" and self._base_microbatch is not None:
                rows = self.microbatch_rows(self._base_microbatch, full, self.seq_len)
                if rows != self._base_microbatch:
                    state.device_train_microbatch_size = rows
                    self._set_microbatch = rows
        if self.seq_len != self._logged_len:  # logged when it changes, not every batch
            self._logged_len = self.seq_len
            logger.log_metrics({"seq_len": self.seq_len})

    def shape_count(self, state: State) -> int:
        """How many distinct (rows, length) microbatch shapes the run trains and evaluates: each warmup
        length's microbatch (and a smaller last one where rows do not divide), the full length, and
        the eval batch and its remainder. With ``compile_config: {dynamic: False}`` each is a recompile."""
        rows = getattr(state.train_dataloader, "batch_size", None) or 1
        mb = state.device_train_microbatch_size if isinstance(state.device_train_microbatch_size, int) else rows
        manifest = self.run_facts.manifest if self.run_facts is not None else None
        full = int(manifest["seq_len"]) if manifest else self.max_seq_length
        lengths = ({n for _, n in self.steps} if self.steps is not None else
                   set(range(self.min_seq_length, self.max_seq_length, self.step_size)) | {self.max_seq_length})
        shapes = set()
        for length in lengths | {full}:
            total, per = rows, mb
            if self.mode == "reshape" and length < full:
                total, per = rows * -(-full // length), self.microbatch_rows(mb, full, length)
            shapes |= {(min(per, total), length)} | ({(total % per, length)} if total % per else set())
        return len(shapes) + 2  # eval: a full batch and the last, smaller one

    def microbatch_rows(self, base: int, full: int, length: int) -> int:
        """Rows per microbatch for a batch of ``full``-token rows reshaped to ``length``, by the policy."""
        if self.microbatch_policy == "rows":
            return base
        rows = max(1, base * full // length)  # as many tokens per microbatch as at full length
        if self.microbatch_policy == "bounded":
            rows = max(base, min(rows, int(base * self.max_microbatch_scale)))
        return rows

    def _batch_end(self, state: State, logger: Logger) -> None:
        if self._set_microbatch is not None:
            if state.device_train_microbatch_size != self._set_microbatch and self._base_microbatch:
                # auto microbatching shrank our rows after an OOM: keep the new tokens per microbatch
                ratio = self._set_microbatch / self._base_microbatch
                self._base_microbatch = max(1, int(state.device_train_microbatch_size / ratio))
            state.device_train_microbatch_size = self._base_microbatch
            self._set_microbatch = None
        # Composer counted the batch before it was shortened: count what was trained instead.
        # (self._active follows the run's time: the same answer on every rank)
        if self._active:  # after the warmup no batch is cut: nothing to take off, no collective
            uncount_tokens(state, self._token_excess, reduce=True)
            self._token_excess = 0
            logger.log_metrics({"tokens/trained": int(state.timestamp.token)})
        else:  # over for the rest of the fit (time only moves on): Composer stops calling in
            self._matched = frozenset((Event.FIT_START,))

    def _preallocate(self, state: State, batch: Mapping[str, Any]) -> None:
        """One forward and backward at max_seq_length on a copy of this batch; no data, no RNG drawn.

        Rows: the Trainer's microbatch size (``auto`` skips the pass at FIT_START: Composer's own search
        sizes memory there). Without FSDP the pass runs on the model under any DDP wrapper, with no
        collective inside it: an out-of-memory error (torch's ``OutOfMemoryError`` or a ``RuntimeError``
        saying CUDA ran out of memory, as Composer tells them) skips it, and the outcome is all-reduced
        so every rank reports the same. Under FSDP2 the pass's all-gathers and reduce-scatters run on
        every rank: an OOM on one rank leaves the others inside a collective, which no rank can undo,
        so it is raised (the launcher then ends every rank) rather than caught. An OOM there also means
        the run would run out of memory at the end of the warmup, at this length and microbatch.
        """
        rows = state.device_train_microbatch_size if isinstance(state.device_train_microbatch_size, int) else 1
        sample = set_batch_sequence_length(batch, self.max_seq_length, "truncate")
        sample = state.device.batch_to_device(select_rows(sample, rows))
        model = unwrap_composer(state.model)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        oom = False
        try:
            with torch.random.fork_rng(devices=devices):
                loss = batch_loss(model, sample, state.precision, state.precision_config)
                loss.backward()
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            if state.fsdp_enabled:
                raise RuntimeError(f"SeqLengthWarmup: pre-allocation at {self.max_seq_length} tokens x {rows} rows "
                                   "ran out of memory under FSDP (the run would at the end of the warmup); lower "
                                   "device_train_microbatch_size or set preallocate: false") from e
            oom = True
        finally:
            loss = sample = None
            for p in model.parameters():
                p.grad = None
        # here the exception and its traceback (whose frames hold the pass's activations) are released,
        # so the cache can hand their memory back
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if any_rank(state, oom):
            self.preallocation = "oom"
            warnings.warn(f"SeqLengthWarmup: pre-allocation at {self.max_seq_length} tokens x {rows} rows ran out "
                          "of memory and was skipped")
        else:
            self.preallocation = "done"

    def plan_events(self, now, batch: int, model, record: dict[str, Any]) -> list[dict[str, Any]]:
        """``composer-growth plan``: the warmup's end, at the batch end after which batches keep their length."""
        if record.get("over") or not self.over_at(now):
            return []
        record["over"] = True
        return [{"event": "seq_length_warmup", "batch": batch,
                 "text": f"{self.min_seq_length} -> {self.max_seq_length} tokens over {batch} batches"}]

    def _over_text(self) -> str:
        return (f"over after {self.over_batch} batches ({self.min_seq_length} -> {self.max_seq_length} tokens); "
                f"batches keep their full length from here")

    def run_events(self) -> list[dict[str, Any]]:
        if self.over_batch is None:
            return []
        return [{"batch": self.over_batch, "name": "seq_length_warmup", "text": self._over_text()}]

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()  # Composer's base: {'repr': ...}
        out["seq_len"] = int(self.seq_len)
        out["over_batch"] = self.over_batch
        return out

    def restore(self, state: dict[str, Any]) -> None:
        self.seq_len = int(state.get("seq_len", self.min_seq_length))
        self.over_batch = state.get("over_batch")

