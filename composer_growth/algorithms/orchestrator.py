"""Loss-triggered orchestration: an ordered schedule of operations, each fired by the eval loss or a timeout.

A schedule is a list of operations, run in order. The next one fires when the monitored eval
loss drops below its ``trigger_loss`` (judged right after each eval), or when its ``max_wait``
has passed since the last operation fired (judged at the end of every batch). With
``reevaluate`` the loss is measured again right after the operation (on the monitored
evaluator's batches), and the next trigger is judged on it at once, so operations can cascade
at one batch; without it the next trigger waits for the next eval.

Every operation is one entry of :data:`OPS` (name -> :class:`OpKind`): hyperparameter operations
act on the optimizer, schedulers, microbatching, evaluators or the train loader; architecture
and LoRA-rank operations go through :func:`composer_growth.algorithms.surgery.grow` (optimizer
state carried, schedulers, DDP and compile rebuilt); LoRA operations use
:mod:`composer_growth.functional.lora`.

Ranks agree: rank 0 decides that an operation fires and broadcasts it; every rank applies it at
the same batch. A checkpoint holds the fired operations, the batch of each, and the settings
they changed; a resumed run replays the architecture operations before the weights load and
continues as the uninterrupted run would.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist, ensure_tuple

from composer_growth.algorithms.surgery import check_recipe_sharding, check_supported, grow, install_replay_hook
from composer_growth.errors import ConfigError, check, check_flag, is_int, is_number
from composer_growth.families import FAMILIES, family_of
from composer_growth.functional.growth import STACK_INITS, stack_layers, widen_mlp
from composer_growth.functional.lora import (LORA_GROUPS, PRUNE_MODES, lora_targets, merge_and_reinit_lora,
                                             prune_optimizer_state, resize_lora_rank, scale_lora_alpha)
from composer_growth.functional.sharding import full_state, reshard
from composer_growth.registry import register_algorithm
from composer_growth.runfacts import RunFacts, check_at_fit_start
from composer_growth.timeutil import elapsed, parse_time
from composer_growth.unwrap import composer_model, unwrap_hf

log = logging.getLogger(__name__)

ENTRY_KEYS = ("name", "value", "trigger_loss", "max_wait_iters", "max_wait", "reevaluate", "args")
DEFAULT_MONITOR = "metrics/eval/LanguageCrossEntropy"
UNITS = {TimeUnit.BATCH: "ba", TimeUnit.TOKEN: "tok", TimeUnit.SAMPLE: "sp", TimeUnit.EPOCH: "ep",
         TimeUnit.DURATION: "dur"}


class Skip(Exception):
    """An operation that cannot act now (said why); the run logs it and goes on."""


# --------------------------------------------------------------------------- values and args


def _multiplier(value: Any, key: str) -> float:
    check(is_number(value) and value > 0, key, value, "a number > 0 (a multiplier)")
    return float(value)


def _nothing(value: Any, key: str) -> None:
    check(value is None, key, value, "null (this operation takes no value)")


def _times(value: Any, key: str) -> int:
    check(is_int(value) and value >= 2, key, value, "an integer >= 2 (copies of the layer stack)")
    return value


def _factor(value: Any, key: str) -> float:
    check(is_number(value) and value > 1, key, value, "a number > 1 (new MLP width / old)")
    return float(value)


def _count(value: Any, key: str) -> int:
    check(is_int(value) and value >= 1, key, value, "an integer >= 1")
    return value


def _batches_or_time(minimum: int) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        if is_int(value):
            check(value >= minimum, key, value, f"an integer >= {minimum} (batches) or a Composer time")
            return f"{value}ba"
        t = parse_time(value, key)
        check(t.unit != TimeUnit.DURATION or minimum == 0 or t.value > 0, key, value, "a time > 0")
        check(t.unit != TimeUnit.EPOCH, key, value, "in ba, tok, sp or dur")
        check(minimum == 0 or t.value > 0, key, value, "a time > 0")
        return str(value) if isinstance(value, str) else f"{t.value}{UNITS[t.unit]}"
    return parse


def _one_of(*choices: str) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        check(value in choices, key, value, f"one of {', '.join(choices)}")
        return value
    return parse


def _seed(value: Any, key: str) -> int:
    check(is_int(value), key, value, "an integer")
    return value


def _noise(value: Any, key: str) -> float:
    check(is_number(value) and value >= 0, key, value, "a number >= 0")
    return float(value)


LORA_TARGETS = LORA_GROUPS


def _divisor(value: Any, key: str) -> int:
    check(is_int(value) and value >= 1, key, value, "an integer >= 1 (the adapters' rank is divided by it)")
    return value


def _prune_ratio(value: Any, key: str) -> float:
    check(is_number(value) and 0 <= value < 1, key, value, "a number in [0, 1)")
    return float(value)


# --------------------------------------------------------------------------- the operations


@dataclass
class Op:
    """One schedule entry, checked."""
    index: int
    name: str
    value: Any
    trigger_loss: float | None
    max_wait: Time | None
    reevaluate: bool
    args: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return self.name if self.value is None else f"{self.name}({self.value:g})" if is_number(self.value) \
            else f"{self.name}({self.value})"


@dataclass(frozen=True)
class OpKind:
    """What a name in a schedule does.

    ``apply(alg, state, op)`` does it and returns one line saying what changed (raises
    :class:`Skip` when it cannot act now); ``value`` checks and normalises the value;
    ``args`` maps each allowed ``args`` key to its checker and default; ``group`` is
    ``hyperparameter``, ``architecture`` or ``lora``; ``replay`` redoes the op before a
    checkpoint's weights load (it changes parameter shapes or module state no checkpoint holds).
    """
    apply: Callable[["Orchestrator", State, Op], str]
    value: Callable[[Any, str], Any]
    group: str
    doc: str
    args: dict[str, tuple[Callable[[Any, str], Any], Any]] = field(default_factory=dict)
    replay: bool = False
    lora: str | None = None  # the LoRA targets the op needs adapters on


def _optimizer_lr(state: State) -> list[float]:
    return [g["lr"] for opt in ensure_tuple(state.optimizers) for g in opt.param_groups]


def _change_lr(alg: "Orchestrator", state: State, op: Op) -> str:
    """Scale the LR from now on: the groups' lr and initial_lr, and every scheduler's base_lrs."""
    before = _optimizer_lr(state)
    for opt in ensure_tuple(state.optimizers):
        for group in opt.param_groups:
            group["lr"] *= op.value
            if "initial_lr" in group:  # what a scheduler rebuilt by surgery.grow starts from
                group["initial_lr"] *= op.value
    for scheduler in state.schedulers:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * op.value for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = _optimizer_lr(state)
    alg.settings["lr_multiplier"] = alg.settings.get("lr_multiplier", 1.0) * op.value
    return (f"lr {before[0]:.3g} -> {_optimizer_lr(state)[0]:.3g} "
            f"(x{alg.settings['lr_multiplier']:g} of the recipe's schedule)")


def _change_batch_size(alg: "Orchestrator", state: State, op: Op) -> str:
    loader = alg._rows_loader
    if loader is None:
        raise Skip("the train loader is not one the orchestrator can resize")
    new = loader.rows * op.value
    world = dist.get_world_size()
    if abs(new - round(new)) > 1e-6 or round(new) < 1:
        raise Skip(f"{loader.rows} rows per rank x {op.value:g} = {new:g} is not a whole number of rows >= 1")
    new = int(round(new))
    mb = state.device_train_microbatch_size
    if isinstance(mb, int) and new > mb and new % mb:
        raise Skip(f"{new} rows per rank do not split into microbatches of {mb}")
    old = loader.rows
    loader.rows = new
    alg.settings["rows"] = new
    return f"global batch {old * world} -> {new * world} rows ({old} -> {new} per rank)"


def _change_grad_accum(alg: "Orchestrator", state: State, op: Op) -> str:
    mb = state.device_train_microbatch_size
    if state.auto_microbatching or not isinstance(mb, int):
        raise Skip("the microbatch size is chosen automatically")
    rows = alg._rank_rows(state)
    new = mb / op.value
    if abs(new - round(new)) > 1e-6 or round(new) < 1 or (rows is not None and rows % round(new)):
        raise Skip(f"microbatch {mb} / {op.value:g} = {new:g} rows does not split the {rows} rows per rank")
    new = int(round(new))
    state.device_train_microbatch_size = new
    alg.settings["microbatch"] = new
    steps = f"{math.ceil(rows / mb)} -> {math.ceil(rows / new)} microbatches per step, " if rows else ""
    return f"{steps}microbatch {mb} -> {new} rows"


def _reset_lr_schedule(alg: "Orchestrator", state: State, op: Op) -> str:
    ts = state.timestamp
    alg.settings["schedule_start"] = {"ba": int(ts.batch), "sp": int(ts.sample), "tok": int(ts.token),
                                      "ep": int(ts.epoch)}
    lr = alg._refresh_lr(state)
    return f"schedule restarted at batch {int(ts.batch)} over the rest of the run; lr now {lr:.3g}"


def _change_warmup_iters(alg: "Orchestrator", state: State, op: Op) -> str:
    old = alg.settings.get("warmup")
    alg._bind_warmup(op.value)
    alg.settings["warmup"] = op.value
    lr = alg._refresh_lr(state)
    was = old or "the recipe's"
    return f"warmup {was} -> {op.value}; lr now {lr:.3g}"


def _change_eval_iters(alg: "Orchestrator", state: State, op: Op) -> str:
    old = [ev.subset_num_batches for ev in state.evaluators]
    alg.settings["eval_batches"] = op.value
    alg._apply_eval_settings(state)
    return f"eval batches {old[0] if old else None} -> {op.value}"


def _change_eval_interval(alg: "Orchestrator", state: State, op: Op) -> str:
    old = alg.settings.get("eval_interval", "the Trainer's")
    alg.settings["eval_interval"] = op.value
    alg._apply_eval_settings(state)
    return f"eval interval {old} -> {op.value}"


def _layers(state: State) -> int:
    hf = unwrap_hf(state.model)
    return getattr(hf.config, family_of(hf).num_layers_key)


def _grow(state: State, op: Callable[[Any], Any]) -> dict[str, Any]:
    """``surgery.grow``; an op that refuses the model as it is now (it checks before it changes anything) is skipped."""
    try:
        return grow(state, op)
    except ConfigError as e:
        raise Skip(str(e)) from None


def _grow_line(info: dict[str, Any]) -> str:
    return (f"params {info['params_before']:,} -> {info['params_after']:,} "
            f"({info['seconds']:.2f} s, optimizer state carried)")


def _stack_layers(alg: "Orchestrator", state: State, op: Op) -> str:
    check_supported(state, "stack_layers")
    before = _layers(state)
    info = _grow(state, lambda m: stack_layers(m, mode="repeat", times=op.value, init=op.args["init"],
                                               seed=op.args["seed"]))
    return f"layers {before} -> {_layers(state)}, {_grow_line(info)}"


def _widen_mlp(alg: "Orchestrator", state: State, op: Op) -> str:
    check_supported(state, "widen_mlp")
    hf = unwrap_hf(state.model)
    family = family_of(hf)
    before = family.intermediate_size(hf.config)
    info = _grow(state, lambda m: widen_mlp(m, op.value, noise_std=op.args["noise_std"], seed=op.args["seed"]))
    return f"MLP width {before} -> {family.intermediate_size(hf.config)}, {_grow_line(info)}"


# LoRA operations: the functional ops of composer_growth.functional.lora


def _lora(state: State, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A LoRA functional op on the model; one that finds no adapters to act on is skipped."""
    try:
        return fn(composer_model(state), *args, **kwargs)
    except ConfigError as e:
        raise Skip(str(e)) from None


def _change_lora_alpha(alg: "Orchestrator", state: State, op: Op) -> str:
    n = _lora(state, scale_lora_alpha, op.value, targets=op.args["targets"])
    alg.settings["lora_alpha"] = alg.settings.get("lora_alpha", 1.0) * op.value
    return f"LoRA alpha x{op.value:g} on {n} adapters (x{alg.settings['lora_alpha']:g} in all)"


def _lora_ranks(state: State, targets: str) -> list[int]:
    return sorted({r for layer in lora_targets(composer_model(state), targets).values() for r in layer.r.values()})


def _lora_rank(targets: str) -> Callable[["Orchestrator", State, Op], str]:
    def apply(alg: "Orchestrator", state: State, op: Op) -> str:
        check_supported(state, op.name)
        before = _lora_ranks_or_skip(state, targets)
        info = _grow(state, lambda m: resize_lora_rank(m, divisor=op.value, targets=targets))
        return f"{targets} LoRA rank {before} -> {_lora_ranks(state, targets)}, {_grow_line(info)}"
    return apply


def _lora_ranks_or_skip(state: State, targets: str) -> list[int]:
    try:
        return _lora_ranks(state, targets)
    except ConfigError as e:
        raise Skip(str(e)) from None


def _merge_lora_weights(alg: "Orchestrator", state: State, op: Op) -> str:
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


_LORA_COMMON = {"targets": (_one_of(*LORA_TARGETS), "all")}

OPS: dict[str, OpKind] = {
    # hyperparameters
    "change_lr": OpKind(_change_lr, _multiplier, "hyperparameter",
                        "multiply the learning rate from now on, under the recipe's schedule (value: multiplier)"),
    "change_batch_size": OpKind(_change_batch_size, _multiplier, "hyperparameter",
                                "multiply the global batch: more or fewer rows per optimizer step (value: multiplier)"),
    "change_grad_accum": OpKind(_change_grad_accum, _multiplier, "hyperparameter",
                                "multiply the microbatches per step, same global batch (value: multiplier)"),
    "reset_lr_schedule": OpKind(_reset_lr_schedule, _nothing, "hyperparameter",
                                "restart the recipe's LR schedule, warmup included, over the rest of the run"),
    "change_warmup_iters": OpKind(_change_warmup_iters, _batches_or_time(0), "hyperparameter",
                                  "set the schedule's warmup (value: batches or a Composer time)"),
    "change_eval_iters": OpKind(_change_eval_iters, _count, "hyperparameter",
                                "set the batches of every eval (value: batches)"),
    "change_eval_interval": OpKind(_change_eval_interval, _batches_or_time(1), "hyperparameter",
                                   "set the eval interval (value: batches or a Composer time)"),
    # architecture
    "stack_layers": OpKind(_stack_layers, _times, "architecture",
                           "G_stack depth growth: repeat the layer stack (value: times)",
                           args={"init": (_one_of(*STACK_INITS), "copy"), "seed": (_seed, 0)}, replay=True),
    "widen_mlp": OpKind(_widen_mlp, _factor, "architecture",
                        "Net2WiderNet MLP width growth (value: factor)",
                        args={"noise_std": (_noise, 0.0), "seed": (_seed, 0)}, replay=True),
    # LoRA
    "change_lora_alpha": OpKind(_change_lora_alpha, _multiplier, "lora",
                                "multiply the LoRA alpha (scaling) of the adapters (value: multiplier)",
                                args=_LORA_COMMON, replay=True, lora="all"),
    "decrease_attn_lora_scaling": OpKind(_lora_rank("attention"), _divisor, "lora",
                                         "attention adapters' rank divided by value", replay=True, lora="attention"),
    "decrease_vocab_lora_scaling": OpKind(_lora_rank("embedding"), _divisor, "lora",
                                          "embedding adapters' rank divided by value", replay=True, lora="embedding"),
    "merge_lora_weights": OpKind(_merge_lora_weights, _nothing, "lora",
                                 "merge the adapters into the base weights and re-initialise them (ReLoRA)",
                                 args={**_LORA_COMMON, "prune": (_one_of(*PRUNE_MODES, "none"), "magnitude"),
                                       "prune_ratio": (_prune_ratio, 0.9), "seed": (_seed, 0)}, lora="all"),
}


# --------------------------------------------------------------------------- the schedule


def load_schedule(schedule: Any) -> list[Any]:
    """A schedule given as a list, or the path of a JSON or YAML file holding one."""
    if isinstance(schedule, str):
        if not os.path.isfile(schedule):
            raise ConfigError("schedule", schedule, "a list of operations or the path of a .json / .yaml file")
        with open(schedule) as f:
            text = f.read()
        try:
            if schedule.endswith(".json"):
                schedule = json.loads(text)
            else:
                import yaml

                schedule = yaml.safe_load(text)
        except ValueError as e:  # json.JSONDecodeError and yaml.YAMLError (via its base) both land here
            raise ConfigError("schedule", schedule, f"not valid JSON / YAML: {str(e).splitlines()[0]}") from None
        except Exception as e:  # noqa: BLE001 - yaml's errors do not derive from ValueError
            raise ConfigError("schedule", schedule, f"not valid YAML: {str(e).splitlines()[0]}") from None
    check(isinstance(schedule, (list, tuple)) and len(schedule) > 0, "schedule", schedule,
          "a non-empty list of operations (name, value, trigger_loss, max_wait_iters, reevaluate)")
    return list(schedule)


def parse_op(i: int, raw: Any, max_wait: Time | None) -> Op:
    key = f"schedule[{i}]"
    check(isinstance(raw, Mapping), key, raw, "a mapping with name, value, trigger_loss, max_wait_iters, reevaluate")
    for k in raw:
        check(k in ENTRY_KEYS, f"{key}.{k}", raw[k], f"unknown key; allowed: {', '.join(ENTRY_KEYS)}")
    name = raw.get("name")
    check(name in OPS, f"{key}.name", name, f"one of {', '.join(OPS)}")
    kind = OPS[name]
    value = kind.value(raw.get("value"), f"{key}.value")
    trigger = raw.get("trigger_loss")
    check(trigger is None or is_number(trigger), f"{key}.trigger_loss", trigger, "a number or null")
    wait_iters, wait = raw.get("max_wait_iters"), raw.get("max_wait")
    check(wait_iters is None or (is_int(wait_iters) and wait_iters >= 1), f"{key}.max_wait_iters", wait_iters,
          "an integer >= 1 (batches) or null")
    check(wait_iters is None or wait is None, f"{key}.max_wait", wait, "not together with max_wait_iters")
    if wait_iters is not None:
        wait_t: Time | None = Time(wait_iters, TimeUnit.BATCH)
    elif wait is not None:
        wait_t = parse_time(wait, f"{key}.max_wait")
        check(wait_t.value > 0, f"{key}.max_wait", wait, "a time > 0")
    else:
        wait_t = max_wait
    check(trigger is not None or wait_t is not None, f"{key}.trigger_loss", trigger,
          "a number, or give the op a max_wait_iters / max_wait (it could never fire)")
    reevaluate = raw.get("reevaluate", False)
    check_flag(reevaluate, f"{key}.reevaluate")
    given = raw.get("args") or {}
    check(isinstance(given, Mapping), f"{key}.args", given, "a mapping of the op's options")
    args = {}
    for arg in given:
        check(arg in kind.args, f"{key}.args.{arg}", given[arg],
              f"unknown option of {name}; allowed: {', '.join(kind.args) or 'none'}")
    for arg, (parse, default) in kind.args.items():
        args[arg] = parse(given[arg], f"{key}.args.{arg}") if arg in given else default
    return Op(index=i, name=name, value=value, trigger_loss=None if trigger is None else float(trigger),
              max_wait=wait_t, reevaluate=reevaluate, args=args)


def parse_monitor(monitor: Any) -> tuple[str, str]:
    """``metrics/<evaluator label>/<metric>`` (as Composer logs it) or a metric name of the ``eval`` evaluator."""
    check(isinstance(monitor, str) and monitor.strip() != "", "monitor", monitor,
          "an eval metric, e.g. metrics/eval/LanguageCrossEntropy")
    parts = monitor.split("/")
    if len(parts) == 1:
        return "eval", parts[0]
    check(len(parts) == 3 and parts[0] == "metrics" and all(parts), "monitor", monitor,
          "metrics/<evaluator label>/<metric name>, e.g. metrics/eval/LanguageCrossEntropy")
    return parts[1], parts[2]


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def eval_metric(state: State, label: str, metric_name: str) -> float | None:
    """The monitored eval metric measured now, as the Trainer's eval would: the evaluator's batches
    (its ``subset_num_batches``), the model's ``eval_forward`` and ``update_metric``, synced over ranks."""
    evaluator = next((ev for ev in state.evaluators if ev.label == label), None)
    metrics = state.eval_metrics.get(label, {})
    if evaluator is None or metric_name not in metrics:
        return None
    metric = copy.deepcopy(metrics[metric_name])
    metric.reset()
    model = composer_model(state)
    spec = evaluator.dataloader
    limit = evaluator.subset_num_batches
    was_training = state.model.training
    state.model.eval()
    try:
        for i, batch in enumerate(spec.dataloader):
            if isinstance(limit, int) and 0 <= limit <= i:
                break
            batch = spec.batch_transforms(batch)
            batch = spec.microbatch_transforms(state.device.batch_to_device(batch))
            with get_precision_context(state.precision, state.precision_config):
                outputs = model.eval_forward(batch)
                model.update_metric(batch, outputs, metric)
    finally:
        state.model.train(was_training)
        reshard(model)  # FSDP2: a no_grad forward leaves the root unsharded
    return float(metric.compute())


class _Restarted:
    """The State as a restarted schedule sees it: time counted from ``start``, the rest of the run as its length."""

    def __init__(self, state: State, start: dict[str, int]):
        self._state = state
        ts = state.timestamp
        self.timestamp = ts.copy(batch=int(ts.batch) - start["ba"], sample=int(ts.sample) - start["sp"],
                                 token=int(ts.token) - start["tok"], epoch=int(ts.epoch) - start["ep"])
        md = state.max_duration
        self.max_duration = Time(int(md.value) - start[UNITS[md.unit]], md.unit)

    def get_elapsed_duration(self) -> Time:
        md = self.max_duration
        return Time(min(1.0, float(self.timestamp.get(md.unit).value) / max(1, int(md.value))), TimeUnit.DURATION)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


def _composer_schedule(scheduler: Any) -> tuple[Any, float] | None:
    """The Composer scheduler and scale-schedule ratio behind a scheduler the Trainer compiled (a LambdaLR)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas or len(lambdas) != 1:
        return None
    fn = getattr(lambdas[0], "_orchestrator_base", lambdas[0])
    try:
        names = inspect.getclosurevars(fn).nonlocals
    except TypeError:
        return None
    if "scheduler" not in names or "state" not in names:
        return None
    return names["scheduler"], float(names.get("ssr", 1.0))


# --------------------------------------------------------------------------- the algorithm


@register_algorithm("orchestrator")
class Orchestrator(Algorithm):
    """Fire an ordered schedule of hyperparameter, architecture and LoRA operations on eval-loss thresholds.

    Args:
        schedule: a list of operations, or the path of a JSON / YAML file holding one. Each is a
            mapping: ``name`` (a key of :data:`OPS`), ``value``, ``trigger_loss`` (fire when the
            monitored loss drops below it; null: only a timeout), ``max_wait_iters`` (batches) or
            ``max_wait`` (a Composer time: ``"2000ba"``, ``"0.1dur"``, ``"5e7tok"``) since the last
            operation fired, ``reevaluate`` (measure the loss again right after the operation and
            judge the next trigger on it) and ``args`` (the operation's other options).
        max_wait: the timeout of operations that give none (default: none, only the loss triggers).
        monitor: the eval metric compared with ``trigger_loss``: ``metrics/<label>/<metric>`` as
            Composer logs it (default ``metrics/eval/LanguageCrossEntropy``).
        verbose: print a block per operation on rank 0.
    """

    def __init__(self, schedule: Any, max_wait: Any = None, monitor: str = DEFAULT_MONITOR, verbose: bool = True):
        raw = load_schedule(schedule)
        self.max_wait = None if max_wait is None else parse_time(max_wait, "max_wait")
        check(self.max_wait is None or self.max_wait.value > 0, "max_wait", max_wait, "a time > 0")
        self.ops = [parse_op(i, entry, self.max_wait) for i, entry in enumerate(raw)]
        self.label, self.metric = parse_monitor(monitor)
        check_flag(verbose, "verbose")
        self.verbose = verbose
        # run state (saved)
        self.fired: list[dict[str, Any]] = []
        self.anchor: dict[str, float] = {"ba": 0, "tok": 0, "sp": 0, "ep": 0, "dur": 0.0}
        self.settings: dict[str, Any] = {}
        self.last_loss: tuple[int, float] | None = None  # (batch, loss) of the last measurement
        # not saved
        self._fresh: float | None = None
        self._rows_loader: Any = None
        self._loader_state: dict[str, Any] | None = None
        self._replayed = 0
        self._lr_schedulers: list[tuple[Any, Any, float]] = []  # (LambdaLR, Composer scheduler, ssr)
        self.run_facts: RunFacts | None = None  # what validate_run checked the options against

    @property
    def next_index(self) -> int:
        return len(self.fired)

    def _uses(self, *names: str) -> bool:
        return any(op.name in names for op in self.ops)

    def _groups(self, group: str) -> list[Op]:
        return [op for op in self.ops if OPS[op.name].group == group]

    # ------------------------------------------------------------------ validation

    def validate_run(self, facts: RunFacts) -> None:
        """Check the schedule against the run and the recipe before anything is built."""
        self.run_facts = facts
        if facts.max_duration.unit == TimeUnit.EPOCH:
            for op in self.ops:
                if op.name in ("change_batch_size", "reset_lr_schedule", "change_warmup_iters"):
                    raise ConfigError(f"schedule[{op.index}].name", op.name, "needs max_duration in ba, tok or sp")
        if not facts.has_recipe:
            return
        self._check_batches(facts.rows_per_device, facts.microbatch, facts.world_size)
        arch = self._groups("architecture") + [op for op in self.ops if op.name.startswith("decrease_")]
        surgery = arch + self._groups("lora")
        if surgery:
            check_recipe_sharding(facts.parallelism, f"schedule[{surgery[0].index}].name={surgery[0].name!r}")
        if arch and facts.model_family is not None and facts.model_family not in FAMILIES:
            op = arch[0]
            raise ConfigError(f"schedule[{op.index}].name", op.name,
                              f"needs a model family in the table ({', '.join(sorted(FAMILIES))}), "
                              f"not {facts.model_family!r}")
        lora = self._groups("lora")
        if lora and facts.peft is None:
            raise ConfigError(f"schedule[{lora[0].index}].name", lora[0].name,
                              "needs a model with LoRA adapters (model.peft)")

    def _check_batches(self, rows: int, microbatch: Any, world: int) -> None:
        """Every batch or microbatch change of the schedule, in order, leaves whole rows on every rank."""
        mb = microbatch if isinstance(microbatch, int) else None
        for op in self.ops:
            key = f"schedule[{op.index}].value"
            if op.name == "change_batch_size":
                new = rows * op.value
                check(abs(new - round(new)) < 1e-6 and round(new) >= 1, key, op.value,
                      f"a multiplier giving whole rows on each of {world} ranks ({rows} per rank now, "
                      f"global batch {rows * world})")
                rows = int(round(new))
                check(mb is None or rows <= mb or rows % mb == 0, key, op.value,
                      f"a multiplier giving rows per rank ({rows}) that split into microbatches of {mb}")
            elif op.name == "change_grad_accum":
                check(mb is not None, key, op.value, "needs a fixed device_train_microbatch_size (not 'auto')")
                new = mb / op.value
                check(abs(new - round(new)) < 1e-6 and round(new) >= 1 and rows % round(new) == 0, key, op.value,
                      f"a multiplier giving a microbatch (now {mb}) that splits the {rows} rows per rank")
                mb = int(round(new))

    def _check_model(self, state: State) -> None:
        """What the live model must offer the schedule: a family in the table, LoRA adapters."""
        model = composer_model(state)
        for op in self._groups("architecture") + [op for op in self.ops if op.name.startswith("decrease_")]:
            family_of(model, key=f"schedule[{op.index}].name={op.name!r}: model family")
        for op in self._groups("lora"):
            targets = op.args.get("targets", OPS[op.name].lora)
            try:
                lora_targets(model, targets)
            except ConfigError as e:
                raise ConfigError(f"schedule[{op.index}].name", op.name, f"needs LoRA adapters on {targets} "
                                  f"modules: {e}") from None

    # ------------------------------------------------------------------ events

    # a frozenset: Composer asks about every event, and a tuple compares with Event's slow __eq__
    _EVENTS = frozenset((Event.INIT, Event.FIT_START, Event.BATCH_END, Event.EVAL_BEFORE_ALL, Event.EVAL_END,
                         Event.EVAL_AFTER_ALL))

    def match(self, event: Event, state: State) -> bool:
        return event in self._EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.INIT:
            self._check_model(state)
            install_replay_hook(state)
        elif event is Event.FIT_START:
            self._fit_start(state, logger)
        elif event is Event.EVAL_BEFORE_ALL:
            self._fresh = None
        elif event is Event.EVAL_END:
            if state.dataloader_label == self.label and self.metric in state.eval_metric_values:
                self._fresh = float(state.eval_metric_values[self.metric])
        elif event is Event.BATCH_END:
            if self._timeout_due(state):
                self._decide(state, logger, None)
        elif event is Event.EVAL_AFTER_ALL:
            loss, self._fresh = self._fresh, None
            if loss is not None:
                self.last_loss = (int(state.timestamp.batch), loss)
            self._decide(state, logger, loss)

    def _fit_start(self, state: State, logger: Logger) -> None:
        check_at_fit_start(self, state)
        if not any(ev.label == self.label for ev in state.evaluators) and any(
                op.trigger_loss is not None for op in self.ops):
            labels = ", ".join(ev.label for ev in state.evaluators) or "none"
            raise ConfigError("monitor", f"metrics/{self.label}/{self.metric}",
                              f"an evaluator of this Trainer (evaluators: {labels})")
        if self._groups("architecture") or self._groups("lora"):
            check_supported(state, "orchestrator")
        if self._uses("change_batch_size"):
            self._install_rows_loader(state)
        mb = self.settings.get("microbatch")
        if mb is not None:
            state.device_train_microbatch_size = mb
        rows = self._rank_rows(state)
        if rows is not None and self.next_index == 0:
            mb0 = state.device_train_microbatch_size
            try:
                self._check_batches(rows, None if state.auto_microbatching else mb0, dist.get_world_size())
            except ConfigError as e:
                raise ConfigError(e.key, e.value, e.allowed) from None
        if self._uses("reset_lr_schedule", "change_warmup_iters"):
            self._install_lr_schedule(state)
        self._apply_eval_settings(state)

    def _rank_rows(self, state: State) -> int | None:
        if self._rows_loader is not None:
            return self._rows_loader.rows
        return getattr(state.train_dataloader, "batch_size", None)

    # ------------------------------------------------------------------ train loader

    def _install_rows_loader(self, state: State) -> None:
        """Hand the Trainer a loader whose rows per batch can change mid-epoch (see data/rows.py)."""
        from torch.utils.data import DataLoader

        from composer_growth.data.phased import LoaderSource
        from composer_growth.data.rows import RowsLoader

        if self._rows_loader is not None:  # a second fit() goes on where the first stopped
            state.set_dataloader(self._rows_loader, state.dataloader_label or "train")
            return
        loader = state.dataloader
        rows = getattr(loader, "batch_size", None)
        op = next(op for op in self.ops if op.name == "change_batch_size")
        if not isinstance(loader, DataLoader) or not rows:
            raise ConfigError(f"schedule[{op.index}].name", op.name,
                              f"needs the Trainer's train loader to be a DataLoader with a batch size, "
                              f"not {type(loader).__name__}")
        source = LoaderSource("train", loader)
        self._rows_loader = RowsLoader(source, rows)
        if self._loader_state is not None:
            source.resume = self._loader_state.get("source")
            self._rows_loader.load_state_dict(self._loader_state)
            self._loader_state = None
        state.set_dataloader(self._rows_loader, state.dataloader_label or "train")
        state.dataset_resumption["train"] = True  # positions are ours: no spinning by the Trainer

    # ------------------------------------------------------------------ LR schedule

    def _install_lr_schedule(self, state: State) -> None:
        """Evaluate the recipe's schedulers through a restartable view of the run's time."""
        if self._lr_schedulers:
            return
        op = next(op for op in self.ops if op.name in ("reset_lr_schedule", "change_warmup_iters"))
        for scheduler in state.schedulers:
            found = _composer_schedule(scheduler)
            if found is None:
                raise ConfigError(f"schedule[{op.index}].name", op.name,
                                  f"needs a Composer scheduler (e.g. cosine_with_warmup), "
                                  f"not {type(scheduler).__name__}")
            composer_sched, ssr = found
            base = scheduler.lr_lambdas[0]
            entry = [scheduler, composer_sched, ssr]
            self._lr_schedulers.append(entry)  # type: ignore[arg-type]

            def lr_lambda(_epoch: int, entry=entry) -> float:
                view = self._schedule_view(state)
                sched, ratio = entry[1], entry[2]
                return sched(view, ratio) if len(inspect.signature(sched).parameters) > 1 else sched(view)

            lr_lambda._orchestrator_base = base  # type: ignore[attr-defined]
            scheduler.lr_lambdas = [lr_lambda]
        self._original_schedulers = [entry[1] for entry in self._lr_schedulers]
        if self._uses("change_warmup_iters"):
            op = next(op for op in self.ops if op.name == "change_warmup_iters")
            for original in self._original_schedulers:
                if "t_warmup" not in inspect.signature(type(original)).parameters:
                    raise ConfigError(f"schedule[{op.index}].name", op.name,
                                      f"needs a scheduler with a warmup, not {type(original).__name__}")
        if self.settings.get("warmup") is not None:
            self._bind_warmup(self.settings["warmup"])

    def _schedule_view(self, state: State) -> Any:
        start = self.settings.get("schedule_start")
        return state if start is None else _Restarted(state, start)

    def _bind_warmup(self, warmup: str) -> None:
        """Every scheduler rebuilt from its own arguments with ``t_warmup`` = ``warmup``."""
        rebuilt = []
        for original in self._original_schedulers:
            params = inspect.signature(type(original)).parameters
            if "t_warmup" not in params:
                raise Skip(f"{type(original).__name__} has no warmup")
            kwargs = {name: getattr(original, name) for name in params if hasattr(original, name)}
            kwargs["t_warmup"] = warmup
            rebuilt.append(type(original)(**kwargs))
        for entry, sched in zip(self._lr_schedulers, rebuilt):
            entry[1] = sched

    def _refresh_lr(self, state: State) -> float:
        """Put each optimizer group on its scheduler's value now (the next batch trains with it)."""
        for scheduler in state.schedulers:
            if hasattr(scheduler, "lr_lambdas"):
                factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
                if len(factors) == 1:
                    factors = factors * len(scheduler.base_lrs)
                for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, factors):
                    group["lr"] = base * f
                scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
        return _optimizer_lr(state)[0]

    # ------------------------------------------------------------------ evaluators

    def _apply_eval_settings(self, state: State) -> None:
        n, interval = self.settings.get("eval_batches"), self.settings.get("eval_interval")
        for ev in state.evaluators:
            if n is not None:
                ev.subset_num_batches = n
            if interval is not None:
                ev.eval_interval = interval

    # ------------------------------------------------------------------ deciding

    def _since(self, state: State, unit: TimeUnit) -> float:
        return elapsed(state, unit) - float(self.anchor[UNITS[unit]])

    def plan_events(self, now, batch: int, model: torch.nn.Module, record: dict[str, Any]) -> list[dict[str, Any]]:
        """``composer-growth plan``: the ops whose ``max_wait`` runs out at the end of batch ``batch`` when no
        loss triggers any (the latest each fires); ``record`` keeps the plan's state."""
        events = []
        i = record.setdefault("next", 0)
        anchor = record.setdefault("anchor", {})
        while i < len(self.ops):
            op, wait = self.ops[i], self.ops[i].max_wait
            if wait is None or now(wait.unit) - anchor.get(wait.unit, 0.0) < float(wait.value):
                break
            events.append(self._plan_event(op, batch))
            record["anchor"] = anchor = {u: now(u) for u in (TimeUnit.BATCH, TimeUnit.TOKEN, TimeUnit.SAMPLE,
                                                              TimeUnit.DURATION)}
            i = record["next"] = i + 1
        return events

    def plan_pending(self, record: dict[str, Any], batch: int) -> list[dict[str, Any]]:
        """``composer-growth plan``: the ops no timeout fires within the run (only a loss can)."""
        return [self._plan_event(op, batch, latest=False) for op in self.ops[record.get("next", 0):]]

    @staticmethod
    def _plan_event(op: Op, batch: int, latest: bool = True) -> dict[str, Any]:
        when = f"when eval loss < {op.trigger_loss:g}" if op.trigger_loss is not None else "on its timeout"
        by = f"at the latest by batch {batch}" if latest else "not by a timeout within the run"
        return {"event": "orchestrator", "batch": batch if latest else None, "op": op.label(),
                "trigger_loss": op.trigger_loss, "latest_batch": batch if latest else None, "text": f"{when}, {by}"}

    def _timeout_due(self, state: State) -> bool:
        """The next op's max_wait has passed (the Trainer's time is the same on every rank)."""
        if self.next_index >= len(self.ops):
            return False
        wait = self.ops[self.next_index].max_wait
        return wait is not None and self._since(state, wait.unit) >= float(wait.value)

    def _reason(self, state: State, loss: float | None) -> str | None:
        if self.next_index >= len(self.ops):
            return None
        op = self.ops[self.next_index]
        if loss is not None and op.trigger_loss is not None and loss < op.trigger_loss:
            return "loss"
        if self._timeout_due(state):
            return "timeout"
        return None

    def _decide(self, state: State, logger: Logger, loss: float | None) -> None:
        """Fire the next ops while rank 0 says their trigger holds; a re-evaluated loss judges the next one."""
        while self.next_index < len(self.ops):
            decision = [self._reason(state, loss) if dist.get_global_rank() == 0 else None, loss]
            dist.broadcast_object_list(decision, src=0)
            reason, loss = decision
            if reason is None:
                return
            loss = self._fire(state, logger, self.ops[self.next_index], reason, loss)

    def _fire(self, state: State, logger: Logger, op: Op, reason: str, loss: float | None) -> float | None:
        batch = int(state.timestamp.batch)
        if op.reevaluate and loss is None:  # a timeout: measure the loss before, to compare with after
            loss = eval_metric(state, self.label, self.metric)
        before = loss if loss is not None else (self.last_loss[1] if self.last_loss else None)
        before_batch = batch if loss is not None else (self.last_loss[0] if self.last_loss else None)
        wait = op.max_wait
        since = self._since(state, wait.unit) if wait is not None else None
        status = "applied"
        start = time.perf_counter()
        try:
            did = OPS[op.name].apply(self, state, op)
        except Skip as e:
            status, did = "skipped", f"skipped: {e}"
        seconds = time.perf_counter() - start
        after = None
        if op.reevaluate:
            after = eval_metric(state, self.label, self.metric)
            if after is not None:
                self.last_loss = (batch, after)
        ts = state.timestamp
        self.anchor = {"ba": int(ts.batch), "tok": int(ts.token), "sp": int(ts.sample),
                       "ep": elapsed(state, TimeUnit.EPOCH), "dur": elapsed(state, TimeUnit.DURATION)}
        record = {"index": op.index, "name": op.name, "value": op.value, "batch": batch, "reason": reason,
                  "status": status, "loss_before": before, "loss_before_batch": before_batch, "loss_after": after,
                  "did": did,
                  "seconds": round(seconds, 4)}
        if reason == "loss":
            record["trigger_loss"] = op.trigger_loss
        else:
            record["waited"] = f"{since:g}{UNITS[wait.unit]}"
        self.fired.append(record)
        metrics: dict[str, Any] = {"orchestrator/op": op.name, "orchestrator/index": op.index,
                                   "orchestrator/reason": reason}
        if before is not None:
            metrics["orchestrator/loss_before"] = before
        if after is not None:
            metrics["orchestrator/loss_after"] = after
        logger.log_metrics(metrics)
        if status == "skipped":
            log.warning("orchestrator: schedule[%d] %s skipped at batch %d: %s", op.index, op.name, batch, did)
        if self.verbose and dist.get_global_rank() == 0:
            print("\n".join(self._block(record)), flush=True)
        return after

    def _block(self, r: dict[str, Any]) -> list[str]:
        op = self.ops[r["index"]]
        if r["reason"] == "loss":
            why = f"{self.metric} {r['loss_before']:.4f} < trigger_loss {r['trigger_loss']:g}"
        else:
            why = f"timeout: {r['waited']} since the last op (max_wait {op.max_wait})"
        lines = [f"== orchestrator: schedule[{r['index']}] of {len(self.ops)}: {op.label()} "
                 f"{'fired' if r['status'] == 'applied' else 'SKIPPED'} at batch {r['batch']} ==",
                 f"  why          {why}"]
        if r["loss_before"] is not None:
            lines.append(f"  loss before  {r['loss_before']:.4f} (eval at batch {r['loss_before_batch']})")
        if r["loss_after"] is not None:
            lines.append(f"  loss after   {r['loss_after']:.4f} (re-evaluated)")
        done = r["status"] == "applied"
        lines.append(f"  {'did         ' if done else 'skipped     '} {r['did'].removeprefix('skipped: ')}")
        return lines

    # ------------------------------------------------------------------ summary

    def run_summary(self) -> dict[str, Any]:
        """One line per fired op for the run summary, and the records for its JSON."""
        lines = []
        for r in self.fired:
            why = (f"loss {r['loss_before']:.4f} < {r['trigger_loss']:g}" if r["reason"] == "loss"
                   else f"timeout after {r['waited']}")
            after = f", after {r['loss_after']:.4f}" if r["loss_after"] is not None else ""
            lines.append(f"  [{r['index']}] {self.ops[r['index']].label():<28} batch {r['batch']:<6} "
                         f"{why}{after}{'' if r['status'] == 'applied' else '  SKIPPED: ' + r['did']}")
        pending = len(self.ops) - len(self.fired)
        if pending:
            lines.append(f"  ({pending} op{'s' if pending > 1 else ''} not fired)")
        return {"title": "orchestrator", "lines": lines, "ops": [dict(r) for r in self.fired]}

    # ------------------------------------------------------------------ resume

    def replay(self, state: State, saved: dict[str, Any]) -> None:
        """Before a checkpoint's weights load: redo its fired ops that change shapes or unsaved module state."""
        fired = saved.get("fired") or []
        for r in fired[self._replayed:]:
            i = int(r["index"])
            if i >= len(self.ops) or self.ops[i].name != r["name"]:
                raise ConfigError(f"schedule[{i}].name", self.ops[i].name if i < len(self.ops) else None,
                                  f"the checkpoint was written by a schedule with {r['name']!r} there")
            if r["status"] == "applied" and OPS[r["name"]].replay:
                OPS[r["name"]].apply(self, state, self.ops[i])
        self._replayed = len(fired)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()  # Composer's 'repr'
        out.update(fired=[dict(r) for r in self.fired], anchor=dict(self.anchor),
                   settings=copy.deepcopy(self.settings),
                   last_loss=list(self.last_loss) if self.last_loss else None,
                   loader=self._rows_loader.state_dict() if self._rows_loader is not None else self._loader_state)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired = [dict(r) for r in state.get("fired", [])]
        self.anchor = dict(state.get("anchor", self.anchor))
        self.settings = copy.deepcopy(state.get("settings", {}))
        last = state.get("last_loss")
        self.last_loss = (int(last[0]), float(last[1])) if last else None
        self._loader_state = state.get("loader")
