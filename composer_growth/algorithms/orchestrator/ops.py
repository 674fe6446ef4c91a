"""The orchestrator's operations: one small object per kind, in one table, :data:`OPS` (name -> :class:`OpKind`).

An operation reads and changes the run only through the :class:`RunContext` the orchestrator passes
it. Hyperparameter operations act on the optimizer, schedulers (:mod:`composer_growth.algorithms.lr`),
microbatching, evaluators or the train loader; architecture and LoRA-rank operations go through
:func:`composer_growth.algorithms.surgery.grow`; LoRA operations use :mod:`composer_growth.functional.lora`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from composer.core import State, Time, TimeUnit
from composer.utils import dist, ensure_tuple

from composer_growth.algorithms.composer_hooks import interval_of
from composer_growth.algorithms.lr import (UNIT_SUFFIX, RestartableSchedule, active_multipliers,
                                          refresh_lr, scale_lr, scheduled_lr)
from composer_growth.algorithms.orchestrator import values as v
from composer_growth.algorithms.shard_local import widen_local
from composer_growth.algorithms.stacking import spec_of_value, stack_spec
from composer_growth.algorithms.surgery import check_supported, grow
from composer_growth.errors import ConfigError, check
from composer_growth.families import family_of
from composer_growth.functional.growth import STACK_INITS, widen_mlp
from composer_growth.functional.lora import (LORA_GROUPS, PRUNE_MODES, lora_targets, merge_and_reinit_lora,
                                             prune_optimizer_state, resize_lora_rank, scale_lora_alpha)
from composer_growth.functional.sharding import full_state, reshard
from composer_growth.runfacts import peft_key
from composer_growth.timeutil import parse_time
from composer_growth.unwrap import composer_model, peft_model, unwrap_hf

if TYPE_CHECKING:
    from composer_growth.algorithms.orchestrator.schedule import Op

#: what an operation needs from the run (:attr:`OpKind.needs`)
ROWS_LOADER = "rows_loader"      # a train loader whose rows per batch can change
LR_SCHEDULE = "lr_schedule"      # the recipe's schedulers as RestartableSchedule
LR_WARMUP = "lr_warmup"          # ... each with a warmup
STEP_TIME = "step_time"          # max_duration in ba, tok or sp (not ep)


class Skip(Exception):
    """An operation that cannot act now (said why); the run logs it and goes on."""


@dataclass
class RunContext:
    """What an operation may read and change in the run; the orchestrator passes one to every operation.

    ``settings`` holds what operations changed (saved in the orchestrator's checkpoint and put back at
    ``FIT_START``): ``lr_multiplier``, ``rows``, ``microbatch``, ``schedule_start``, ``warmup``,
    ``eval_batches``, ``eval_interval``; and, for what the blocks say, ``lora_alpha`` and
    ``lora_scaling_<targets>`` (LoRA scaling is put back by replaying the ops).
    """
    state: State
    settings: dict[str, Any]
    rows_loader: Any = None  # the train loader whose ``rows`` per batch can change (data/rows.py), or None
    schedules: list[RestartableSchedule] = field(default_factory=list)  # the recipe's LR schedules

    def rank_rows(self) -> int | None:
        """Rows per batch on this rank."""
        if self.rows_loader is not None:
            return self.rows_loader.rows
        return getattr(self.state.train_dataloader, "batch_size", None)


def apply_eval_settings(state: State, settings: Mapping[str, Any]) -> None:
    """The evaluators' batches and interval as the operations set them."""
    n, interval = settings.get("eval_batches"), settings.get("eval_interval")
    for ev in state.evaluators:
        if n is not None:
            ev.subset_num_batches = n
        if interval is not None:
            ev.eval_interval = interval


@dataclass(frozen=True)
class OpKind:
    """What a name in a schedule does; a subclass per kind implements :meth:`apply`.

    ``name`` is the schedule's ``name``; ``value`` checks and normalises an entry's value (``(value, key) -> value``); ``args`` maps each
    allowed ``args`` key to its checker and default; ``group`` is ``hyperparameter``,
    ``architecture`` or ``lora``; ``surgery``: it changes the model through ``surgery.grow`` (a model
    family of the table, sharding that surgery supports); ``replay``: redone before a checkpoint's
    weights load (it changes parameter shapes or module state no checkpoint holds); ``lora``: the
    LoRA targets it needs adapters on; ``needs``: what it needs from the run (:data:`ROWS_LOADER`,
    :data:`LR_SCHEDULE`, :data:`LR_WARMUP`, :data:`STEP_TIME`).
    """
    name: str
    group: str
    doc: str
    value: Callable[[Any, str], Any]
    args: Mapping[str, tuple[Callable[[Any, str], Any], Any]] = field(default_factory=dict)
    surgery: bool = False
    replay: bool = False
    lora: str | None = None
    needs: frozenset[str] = frozenset()

    def apply(self, run: RunContext, op: Op) -> str:
        """Do it; return one line saying what changed (raise :class:`Skip` when it cannot act now)."""
        raise NotImplementedError

    def plan_batches(self, rows: int, microbatch: int | None, value: Any, key: str,
                     world: int) -> tuple[int, int | None]:
        """Rows per rank and microbatch after this op (checked: whole rows, whole microbatches)."""
        return rows, microbatch


# --------------------------------------------------------------------------- hyperparameters


class ChangeLr(OpKind):
    def apply(self, run: RunContext, op: Op) -> str:
        before = scheduled_lr(run.state)
        scale_lr(run.state, op.value)
        run.settings["lr_multiplier"] = run.settings.get("lr_multiplier", 1.0) * op.value
        others = "".join(f"; x{f:g} from {name} now" for name, f in active_multipliers(run.state).items())
        return (f"scheduled lr {before:.3g} -> {before * op.value:.3g} "
                f"(x{run.settings['lr_multiplier']:g} of the recipe's schedule{others})")


def _loader(run: RunContext) -> Any:
    if run.rows_loader is None:
        raise Skip("the train loader is not one the orchestrator can resize")
    return run.rows_loader


def _set_rows(run: RunContext, new: int) -> str:
    """Rows per rank from the next batch, cut by the orchestrator's train loader (data/rows.py)."""
    loader = _loader(run)
    old, world = loader.rows, dist.get_world_size()
    loader.rows = new
    run.settings["rows"] = new
    return f"global batch {old * world} -> {new * world} rows ({old} -> {new} per rank)"


def _whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-6 and round(x) >= 1


class ChangeBatchSize(OpKind):
    def apply(self, run: RunContext, op: Op) -> str:
        rows = _loader(run).rows
        new = rows * op.value
        if not _whole(new):
            raise Skip(f"{rows} rows per rank x {op.value:g} = {new:g} is not a whole number of rows >= 1")
        new = int(round(new))
        mb = run.state.device_train_microbatch_size
        if isinstance(mb, int) and new > mb and new % mb:
            raise Skip(f"{new} rows per rank do not split into microbatches of {mb}")
        return _set_rows(run, new)

    def plan_batches(self, rows: int, microbatch: int | None, value: Any, key: str,
                     world: int) -> tuple[int, int | None]:
        new = rows * value
        check(_whole(new), key, value, f"a multiplier giving whole rows on each of {world} ranks ({rows} per rank "
                                       f"now, global batch {rows * world})")
        rows = int(round(new))
        check(microbatch is None or rows <= microbatch or rows % microbatch == 0, key, value,
              f"a multiplier giving rows per rank ({rows}) that split into microbatches of {microbatch}")
        return rows, microbatch


def _fixed_microbatch(state: State) -> int:
    mb = state.device_train_microbatch_size
    if state.auto_microbatching or not isinstance(mb, int):
        raise Skip("the microbatch size is chosen automatically")
    return mb


class ChangeGradAccum(OpKind):
    """More (or fewer) microbatches per step, each of the same size: the batch per step grows with them."""

    def apply(self, run: RunContext, op: Op) -> str:
        mb, rows = _fixed_microbatch(run.state), _loader(run).rows
        size = min(mb, rows)  # the rows a microbatch holds now
        if rows % size:
            raise Skip(f"{rows} rows per rank are not whole microbatches of {size}")
        accum = rows // size
        new = accum * op.value
        if not _whole(new):
            raise Skip(f"{accum} microbatches per step x {op.value:g} = {new:g} is not a whole number >= 1")
        new = int(round(new))
        if size != mb:  # the microbatch keeps the rows it held
            run.state.device_train_microbatch_size = run.settings["microbatch"] = size
        return f"{accum} -> {new} microbatches of {size} rows per step, {_set_rows(run, size * new)}"

    def plan_batches(self, rows: int, microbatch: int | None, value: Any, key: str,
                     world: int) -> tuple[int, int | None]:
        check(microbatch is not None, key, value, "needs a fixed device_train_microbatch_size (not 'auto')")
        size = min(microbatch, rows)
        check(rows % size == 0, key, value, f"a run whose rows per rank ({rows}) are whole microbatches of {size}")
        new = rows // size * value
        check(_whole(new), key, value, f"a multiplier giving a whole number >= 1 of microbatches per step "
                                       f"({rows // size} of {size} rows now)")
        return size * int(round(new)), size


class SetMicrobatches(OpKind):
    """Split the same batch into ``value`` microbatches per step."""

    def apply(self, run: RunContext, op: Op) -> str:
        mb, rows = _fixed_microbatch(run.state), run.rank_rows()
        if rows is None or rows % op.value:
            raise Skip(f"{rows} rows per rank do not split into {op.value} microbatches")
        new = rows // op.value
        run.state.device_train_microbatch_size = run.settings["microbatch"] = new
        return f"{math.ceil(rows / mb)} -> {op.value} microbatches per step, microbatch {mb} -> {new} rows"

    def plan_batches(self, rows: int, microbatch: int | None, value: Any, key: str,
                     world: int) -> tuple[int, int | None]:
        check(microbatch is not None, key, value, "needs a fixed device_train_microbatch_size (not 'auto')")
        check(rows % value == 0, key, value, f"a number of microbatches that splits the {rows} rows per rank")
        return rows, rows // value


class ResetLrSchedule(OpKind):
    def apply(self, run: RunContext, op: Op) -> str:
        ts = run.state.timestamp
        start = {"ba": int(ts.batch), "sp": int(ts.sample), "tok": int(ts.token), "ep": int(ts.epoch)}
        run.settings["schedule_start"] = start
        for schedule in run.schedules:
            schedule.restart(start)
        lr = refresh_lr(run.state)
        return f"schedule restarted at batch {int(ts.batch)} over the rest of the run; lr now {lr:.3g}"


# a seed-style op multiplies the run's current value; its set_* twin sets a value outright


def time_str(t: Time) -> str:
    return f"{float(t.value):g}dur" if t.unit == TimeUnit.DURATION else f"{int(t.value)}{UNIT_SUFFIX[t.unit]}"


def scaled(t: Time, factor: float) -> Time:
    """``t`` x ``factor`` in its own unit, a whole count >= 1 (0 stays 0); a share of the run (dur) stays one."""
    if t.unit == TimeUnit.DURATION:
        return Time(min(1.0, float(t.value) * factor), TimeUnit.DURATION)
    return t if int(t.value) == 0 else Time(max(1, int(float(t.value) * factor + 0.5)), t.unit)


def in_run_units(state: State, t: Time) -> Time:
    """A share of the run (dur) as the count of ``max_duration``'s unit it stands for (rounded up, as
    Composer counts it), so it needs no sized train loader; other times, and any with max_duration in
    epochs, as they are."""
    md = state.max_duration
    if t.unit != TimeUnit.DURATION or md is None or md.unit == TimeUnit.EPOCH:
        return t
    return Time(max(1, math.ceil(float(md.value) * float(t.value))), md.unit)


class SetWarmupIters(OpKind):
    def warmup(self, run: RunContext, op: Op, old: Time) -> str:
        return op.value

    def apply(self, run: RunContext, op: Op) -> str:
        for schedule in run.schedules:
            if not schedule.has_warmup:
                raise Skip(f"{type(schedule.schedule).__name__} has no warmup")
        old = parse_time(run.settings.get("warmup") or run.schedules[0].schedule.t_warmup, "t_warmup")
        new = self.warmup(run, op, old)
        for schedule in run.schedules:
            schedule.set_warmup(new)
        run.settings["warmup"] = new
        lr = refresh_lr(run.state)
        return f"warmup {time_str(old)} -> {new}; lr now {lr:.3g}"


class ChangeWarmupIters(SetWarmupIters):
    def warmup(self, run: RunContext, op: Op, old: Time) -> str:
        return time_str(scaled(old, op.value))


def _eval_batches_now(state: State) -> int | None:
    """Batches of the first evaluator's eval: its ``subset_num_batches``, else its loader's length."""
    for ev in state.evaluators:
        if isinstance(ev.subset_num_batches, int) and ev.subset_num_batches > 0:
            return ev.subset_num_batches
        try:
            return len(ev.dataloader.dataloader)
        except TypeError:
            return None
    return None


class SetEvalIters(OpKind):
    def eval_batches(self, op: Op, old: int | None) -> int:
        return op.value

    def apply(self, run: RunContext, op: Op) -> str:
        old = _eval_batches_now(run.state)
        run.settings["eval_batches"] = new = self.eval_batches(op, old)
        apply_eval_settings(run.state, run.settings)
        return f"eval batches {old} -> {new}"


class ChangeEvalIters(SetEvalIters):
    def eval_batches(self, op: Op, old: int | None) -> int:
        if old is None:
            raise Skip("the eval loader has no length and no subset_num_batches to multiply")
        return max(1, int(old * op.value + 0.5))


def _eval_interval_now(run: RunContext) -> Time | None:
    """The interval the evaluators run at: the last one an op set, else the first evaluator's."""
    if run.settings.get("eval_interval") is not None:
        return Time.from_timestring(run.settings["eval_interval"])
    return next((t for t in (interval_of(ev.eval_interval) for ev in run.state.evaluators) if t is not None), None)


class SetEvalInterval(OpKind):
    def interval(self, run: RunContext, op: Op, old: Time | None) -> Time:
        return parse_time(op.value, "eval_interval")

    def apply(self, run: RunContext, op: Op) -> str:
        old = _eval_interval_now(run)
        new = time_str(in_run_units(run.state, self.interval(run, op, old)))
        run.settings["eval_interval"] = new
        apply_eval_settings(run.state, run.settings)
        was = time_str(old) if old is not None else "the Trainer's"
        return f"eval interval {was} -> {new}"


class ChangeEvalInterval(SetEvalInterval):
    def interval(self, run: RunContext, op: Op, old: Time | None) -> Time:
        if old is None:
            raise Skip("the evaluators' interval is a function, not a Composer time to multiply")
        return scaled(in_run_units(run.state, old), op.value)


def batch_intervals(state: State) -> None:
    """Evaluators' intervals given as a share of the run (dur) in ``max_duration``'s unit instead:
    Composer's dur intervals need a sized train loader, which the orchestrator's is not."""
    for ev in state.evaluators:
        t = interval_of(ev.eval_interval)
        if t is not None and t.unit == TimeUnit.DURATION:
            ev.eval_interval = time_str(in_run_units(state, t))


# --------------------------------------------------------------------------- architecture


def _layers(state: State) -> int:
    hf = unwrap_hf(state.model)
    return getattr(hf.config, family_of(hf).num_layers_key)


def _grow(state: State, op: Callable[[Any], Any], local: Callable[..., Any] | None = None) -> dict[str, Any]:
    """``surgery.grow``; an op that refuses the model as it is now (it checks before it changes anything) is skipped."""
    try:
        return grow(state, op, local=local)
    except ConfigError as e:
        raise Skip(str(e)) from None


def _grow_line(info: dict[str, Any]) -> str:
    path = "" if info["path"] == "unsharded" else f", {info['path']}"
    return (f"params {info['params_before']:,} -> {info['params_after']:,} "
            f"({info['seconds']:.2f} s{path}, optimizer state carried)")


class StackLayers(OpKind):
    """The ``StackLayers`` algorithm's growth (:class:`~composer_growth.algorithms.stacking.StackSpec`): value
    ``times``, or a mapping of its options (mode, num_new, trunk, stack_lora, ...); ``init`` and ``seed`` in args."""

    def apply(self, run: RunContext, op: Op) -> str:
        state = run.state
        check_supported(state, "stack_layers")
        spec = spec_of_value(op.value, op.args["init"], op.args["seed"])
        if spec.trunk == "lora" and peft_model(state.model) is not None:
            raise Skip(f"trunk 'lora' needs a model without {peft_key(state.model)}")
        before = _layers(state)
        try:
            info = grow(state, spec.op, spec.after, spec.local)
        except ConfigError as e:
            raise Skip(str(e)) from None
        return f"layers {before} -> {_layers(state)}, {_grow_line(info)}"


class WidenMlp(OpKind):
    def apply(self, run: RunContext, op: Op) -> str:
        state = run.state
        check_supported(state, "widen_mlp")
        hf = unwrap_hf(state.model)
        family = family_of(hf)
        before = family.intermediate_size(hf.config)
        args = {"noise_std": op.args["noise_std"], "seed": op.args["seed"]}
        info = _grow(state, lambda m: widen_mlp(m, op.value, **args),
                     lambda m, units: widen_local(m, units, op.value, **args))
        return f"MLP width {before} -> {family.intermediate_size(hf.config)}, {_grow_line(info)}"


# --------------------------------------------------------------------------- LoRA


def _lora(state: State, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A LoRA functional op on the model; one that finds no adapters to act on is skipped."""
    try:
        return fn(composer_model(state), *args, **kwargs)
    except ConfigError as e:
        raise Skip(str(e)) from None


def _lora_ranks(state: State, targets: str) -> list[int]:
    return sorted({r for layer in lora_targets(composer_model(state), targets).values() for r in layer.r.values()})


class ChangeLoraAlpha(OpKind):
    def apply(self, run: RunContext, op: Op) -> str:
        n = _lora(run.state, scale_lora_alpha, op.value, targets=op.args["targets"])
        run.settings["lora_alpha"] = run.settings.get("lora_alpha", 1.0) * op.value
        return f"LoRA alpha x{op.value:g} on {n} adapters (x{run.settings['lora_alpha']:g} in all)"


class ScaleLoraGroup(OpKind):
    """Multiply the scaling of the adapters on ``lora`` targets; 0 turns them off (the base model's
    function there; they stay in the optimizer, with no gradient)."""

    def apply(self, run: RunContext, op: Op) -> str:
        n = _lora(run.state, scale_lora_alpha, op.value, targets=self.lora)
        key = f"lora_scaling_{self.lora}"
        run.settings[key] = total = run.settings.get(key, 1.0) * op.value
        return (f"{self.lora} LoRA scaling x{op.value:g} on {n} adapters "
                f"({'off' if total == 0 else f'x{total:g} in all'})")


class LoraRank(OpKind):
    """Divide the rank of the adapters on ``lora`` targets."""

    def apply(self, run: RunContext, op: Op) -> str:
        state, targets = run.state, self.lora
        check_supported(state, op.name)
        try:
            before = _lora_ranks(state, targets)
        except ConfigError as e:
            raise Skip(str(e)) from None
        info = _grow(state, lambda m: resize_lora_rank(m, divisor=op.value, targets=targets))
        return f"{targets} LoRA rank {before} -> {_lora_ranks(state, targets)}, {_grow_line(info)}"


class MergeLora(OpKind):
    def apply(self, run: RunContext, op: Op) -> str:
        state = run.state
        seed = op.args["seed"] + op.index  # the same on every rank; a different draw per schedule entry
        reshard(composer_model(state))  # FSDP2: the merge changes the shards in place
        fresh = _lora(state, merge_and_reinit_lora, targets=op.args["targets"],
                      generator=torch.Generator().manual_seed(seed))
        prune, ratio = op.args["prune"], op.args["prune_ratio"]
        zeroed = 0
        if prune != "none":
            for opt in ensure_tuple(state.optimizers):
                with full_state(opt, fresh):  # FSDP2: prune the whole moments, as one process would
                    zeroed += prune_optimizer_state(opt, fresh, prune, ratio,
                                                    generator=torch.Generator().manual_seed(seed + 1))
        return (f"merged {len(fresh) // 2} adapters into their base weights and re-initialised them; "
                f"{zeroed:,} optimizer moment entries pruned ({prune})")


_LORA_COMMON = {"targets": (v.one_of(*LORA_GROUPS), "all")}

_KINDS = (
    # hyperparameters
    ChangeLr("change_lr", "hyperparameter",
             "multiply the learning rate from now on, under the recipe's schedule (value: multiplier)", v.multiplier),
    ChangeBatchSize("change_batch_size", "hyperparameter",
                    "multiply the global batch: more or fewer rows per optimizer step (value: multiplier)",
                    v.multiplier, needs=frozenset({ROWS_LOADER, STEP_TIME})),
    ChangeGradAccum("change_grad_accum", "hyperparameter",
                    "multiply the microbatches per step, same microbatch size: the global batch grows with them "
                    "(value: multiplier)", v.multiplier_of("microbatches per step", "set_microbatches"),
                    needs=frozenset({ROWS_LOADER, STEP_TIME})),
    SetMicrobatches("set_microbatches", "hyperparameter",
                    "split the same global batch into value microbatches per step (value: count)", v.count),
    ResetLrSchedule("reset_lr_schedule", "hyperparameter",
                    "restart the recipe's LR schedule, warmup included, over the rest of the run", v.nothing,
                    needs=frozenset({LR_SCHEDULE, STEP_TIME})),
    ChangeWarmupIters("change_warmup_iters", "hyperparameter", "multiply the schedule's warmup (value: multiplier)",
                      v.multiplier_of("schedule's warmup", "set_warmup_iters"),
                      needs=frozenset({LR_SCHEDULE, LR_WARMUP, STEP_TIME})),
    SetWarmupIters("set_warmup_iters", "hyperparameter",
                   "set the schedule's warmup (value: batches or a Composer time)", v.batches_or_time(0),
                   needs=frozenset({LR_SCHEDULE, LR_WARMUP, STEP_TIME})),
    ChangeEvalIters("change_eval_iters", "hyperparameter", "multiply the batches of every eval (value: multiplier)",
                    v.multiplier_of("eval batches", "set_eval_iters")),
    SetEvalIters("set_eval_iters", "hyperparameter", "set the batches of every eval (value: batches)", v.count),
    ChangeEvalInterval("change_eval_interval", "hyperparameter", "multiply the eval interval (value: multiplier)",
                       v.multiplier_of("eval interval", "set_eval_interval")),
    SetEvalInterval("set_eval_interval", "hyperparameter",
                    "set the eval interval (value: batches or a Composer time)", v.batches_or_time(1)),
    # architecture
    StackLayers("stack_layers", "architecture",
                "depth growth (value: times, or a mapping of stack_layers options: mode, num_new, trunk, stack_lora, ...)",
                stack_spec, args={"init": (v.one_of(*STACK_INITS), "copy"), "seed": (v.seed, 0)},
                surgery=True, replay=True),
    WidenMlp("widen_mlp", "architecture", "Net2WiderNet MLP width growth (value: factor)", v.factor,
             args={"noise_std": (v.noise, 0.0), "seed": (v.seed, 0)}, surgery=True, replay=True),
    # LoRA
    ChangeLoraAlpha("change_lora_alpha", "lora",
                    "multiply the LoRA alpha (scaling) of the adapters (value: multiplier)", v.multiplier,
                    args=_LORA_COMMON, replay=True, lora="all"),
    ScaleLoraGroup("decrease_attn_lora_scaling", "lora",
                   "multiply the attention adapters' scaling (value: factor in [0, 1]; 0 turns them off)",
                   v.scaling_factor, replay=True, lora="attention"),
    ScaleLoraGroup("decrease_vocab_lora_scaling", "lora",
                   "multiply the embedding adapters' scaling (value: factor in [0, 1]; 0 turns them off)",
                   v.scaling_factor, replay=True, lora="embedding"),
    LoraRank("divide_attn_lora_rank", "lora", "attention adapters' rank divided by value", v.divisor,
             surgery=True, replay=True, lora="attention"),
    LoraRank("divide_vocab_lora_rank", "lora", "embedding adapters' rank divided by value", v.divisor,
             surgery=True, replay=True, lora="embedding"),
    MergeLora("merge_lora_weights", "lora",
              "merge the adapters into the base weights and re-initialise them (ReLoRA)", v.nothing,
              args={**_LORA_COMMON, "prune": (v.one_of(*PRUNE_MODES, "none"), "magnitude"),
                    "prune_ratio": (v.prune_ratio, 0.9), "seed": (v.seed, 0)}, lora="all"),
)

#: every operation, by its name
OPS: dict[str, OpKind] = {kind.name: kind for kind in _KINDS}
