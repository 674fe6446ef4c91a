"""Growth surgery mid-training: ``StackLayers`` (depth) and ``WidenMLP`` (width).

Each fires once, at a Composer time, or on a plateau of the eval loss (``trigger_plateau``, see
:mod:`composer_growth.algorithms.plateau`: judged at the eval, applied at the next batch end, with
``at`` then the latest time), at the end of a batch (after the optimizer step, before eval and
checkpointing), through :func:`composer_growth.algorithms.surgery.grow`, which carries
the optimizer state across and rebuilds schedulers, DDP and compile. A checkpoint written after
the growth resumes with the same recipe: the growth is replayed before the weights load.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from composer.core import Event, State, Time
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from composer_growth.algorithms.base import Now, SuiteAlgorithm
from composer_growth.algorithms.composer_hooks import install_replay_hook
from composer_growth.algorithms.plateau import DEFAULT_MONITOR, Plateau, parse_monitor
from composer_growth.algorithms.shard_local import widen_local
from composer_growth.algorithms.surgery import check_recipe_sharding, check_supported, ensure_flops_per_batch, grow
from composer_growth.events import announce
from composer_growth.errors import ConfigError, check, check_flag, check_int, check_number
from composer_growth.families import FAMILIES, config_get, family_of
from composer_growth.algorithms.stacking import StackSpec
from composer_growth.functional.growth import widen_mlp
from composer_growth.functional.batch import select_rows
from composer_growth.functional.loss import batch_mean_loss
from composer_growth.registry import register_algorithm
from composer_growth.runfacts import RunFacts, check_at_fit_start
from composer_growth.timeutil import (check_progress_known, earliest_batch, elapsed, parse_time, reached,
                                      to_duration_fraction)
from composer_growth.unwrap import composer_model, unwrap_hf

def _shape(model: nn.Module) -> tuple[int, int]:
    """Layer count and MLP width of a model, from its config."""
    hf = unwrap_hf(model)
    family = family_of(hf)
    return int(config_get(hf.config, family.num_layers_key)), family.intermediate_size(hf.config)


class _Growth(SuiteAlgorithm):
    """Shared timing, probing, logging, resume and validation of a one-shot growth."""

    name = "growth"

    def __init__(self, at: Any, probe_loss: bool, trigger_plateau: Any = None, monitor: str = DEFAULT_MONITOR,
                 default_at: str = "0.25dur"):
        self.plateau = None if trigger_plateau is None else Plateau.parse(trigger_plateau)
        if at is None and self.plateau is None:
            at = default_at
        self.at: Time | None = None if at is None else parse_time(at, "at")
        self.label, self.metric = parse_monitor(monitor)
        check_flag(probe_loss, "probe_loss")
        self.probe_loss = probe_loss
        self.applied = False
        self.pending: int | None = None  # the batch of the eval that found the plateau (grows at the next batch end)
        self._fresh: float | None = None
        self._matched = self._EVENTS  # narrowed once the growth is done
        self._earliest: int | None = None  # no batch before this one can be due
        self.record: dict[str, Any] = {}
        self.run_facts: RunFacts | None = None  # what validate_run checked the options against
        self._batch: dict[str, torch.Tensor] | None = None

    # -- what subclasses provide -------------------------------------------------------------
    def _op(self, model: nn.Module):
        raise NotImplementedError

    def _after(self, model: nn.Module, mapping) -> None:
        """Runs after the op, before the optimizer is rebuilt."""

    @property
    def _local(self):
        """The op on each rank's own shards under FSDP2 (``surgery.grow``'s ``local``), or None."""
        return None

    def _check_model_config(self, config: Any) -> None:
        """Reject arguments the model cannot take (from its config), before training."""

    # -- validation -------------------------------------------------------------------------
    def validate_run(self, facts: RunFacts) -> None:
        self.run_facts = facts
        max_duration = facts.max_duration
        frac = None if self.at is None else to_duration_fraction(self.at, max_duration, facts.batches_per_epoch)
        if frac is not None and frac >= 1:
            raise ConfigError("at", str(self.at), f"must fall before the end of the run (max_duration {max_duration})")
        if self.plateau is not None:
            window = to_duration_fraction(self.plateau.window, max_duration, facts.batches_per_epoch)
            if window is not None and window >= 1:
                raise ConfigError("trigger_plateau.window", str(self.plateau.window),
                                  f"a window shorter than the run (max_duration {max_duration})")
        if not facts.has_recipe:
            return
        check_recipe_sharding(facts.parallelism, self.name)
        if facts.model_family is not None:
            if facts.model_family not in FAMILIES:
                raise ConfigError("model.family", facts.model_family,
                                  f"{self.name} supports: {', '.join(sorted(FAMILIES))}")
            if facts.model_config is not None:
                self._check_model_config(facts.model_config)

    # -- events -----------------------------------------------------------------------------
    # A frozenset: Composer asks every algorithm about every event, and a tuple compares with Event's
    # slow __eq__ once per member (tens of microseconds per step); a set hashes once.
    _EVENTS = frozenset((Event.INIT, Event.FIT_START, Event.AFTER_DATALOADER, Event.BATCH_END))
    _PLATEAU_EVENTS = _EVENTS | {Event.EVAL_END, Event.EVAL_AFTER_ALL}
    _DONE_EVENTS = frozenset((Event.INIT, Event.FIT_START))

    def match(self, event: Event, state: State) -> bool:
        return event in self._matched

    def _events(self) -> frozenset:
        return self._DONE_EVENTS if self.applied else self._PLATEAU_EVENTS if self.plateau else self._EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.INIT:
            model = composer_model(state)
            family_of(model, key=f"{self.name}: model family")
            try:
                self._check_model_config(unwrap_hf(model).config)
            except ConfigError as err:
                raise ConfigError(f"{self.name}: {err.key}", err.value, err.allowed) from None
            ensure_flops_per_batch(model)
            install_replay_hook(state)
        elif event is Event.FIT_START:
            check_supported(state, self.name)
            check_at_fit_start(self, state)
            if self.plateau is not None and not any(ev.label == self.label for ev in state.evaluators):
                labels = ", ".join(ev.label for ev in state.evaluators) or "none"
                raise ConfigError(f"{self.name}: monitor", f"metrics/{self.label}/{self.metric}",
                                  f"an evaluator of this Trainer for trigger_plateau (evaluators: {labels})")
            if self.at is not None:
                check_progress_known(state, {"at": self.at}, within=False)
            self._earliest = earliest_batch(state, self.at) if self.at is not None else None
            self._matched = self._events()
        elif event is Event.AFTER_DATALOADER:  # the loss probe's batch, kept from the batch that can fire on
            due = self.pending is not None or (self.at is not None and (
                self._earliest is None or state.timestamp.batch.value + 1 >= self._earliest))
            self._batch = state.batch if self.probe_loss and not self.applied and due else None
        elif event is Event.BATCH_END and not self.applied:
            if self.pending is None and (self.at is None or (self._earliest is not None
                                                             and state.timestamp.batch.value < self._earliest)):
                return  # not due yet: one integer comparison per batch
            if self.pending is not None or reached(state, self.at):
                self._fire(state, logger)
                self._matched = self._DONE_EVENTS
        elif event is Event.EVAL_END:
            if state.dataloader_label == self.label and self.metric in state.eval_metric_values:
                self._fresh = float(state.eval_metric_values[self.metric])
        elif event is Event.EVAL_AFTER_ALL and not self.applied:
            loss, self._fresh = self._fresh, None
            if loss is not None and self.pending is None:
                self._judge_plateau(state, loss)

    def _judge_plateau(self, state: State, loss: float) -> None:
        """Feed the plateau the eval loss (reduced over ranks); rank 0 decides and every rank follows."""
        self.plateau.observe(elapsed(state, self.plateau.unit), loss)
        decision = [self.plateau.reached() if dist.get_global_rank() == 0 else None]
        dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            self.pending = int(state.timestamp.batch)

    def _fire(self, state: State, logger: Logger) -> None:
        before = self._probe(state)
        shape_before = _shape(composer_model(state))
        info = grow(state, self._op, self._after, self._local)
        after = self._probe(state)
        shape_after = _shape(composer_model(state))
        self.applied = True
        self.record = {"batch": int(state.timestamp.batch), "params_before": info["params_before"],
                       "params_after": info["params_after"], "trainable_after": info["trainable_after"],
                       "seconds": float(info["seconds"]), "path": info["path"]}
        if self.pending is not None:
            self.record.update(plateau_eval_batch=self.pending, plateau_improvement=self.plateau.improvement())
        metrics = {f"growth/{self.name}/{k}": v for k, v in self.record.items()
                   if k not in ("batch", "plateau_eval_batch", "path")}
        if before is not None:
            metrics.update({f"growth/{self.name}/loss_before": before, f"growth/{self.name}/loss_after": after})
            self.record.update(loss_before=before, loss_after=after)
        metrics["growth/params"] = info["params_after"]
        logger.log_metrics(metrics)
        self._batch = None
        text = (f"layers {shape_before[0]} -> {shape_after[0]}, MLP width {shape_before[1]} -> {shape_after[1]}, "
                f"params {info['params_before']:,} -> {info['params_after']:,}, {info['seconds']:.2f} s")
        if info["path"] != "unsharded":
            text += f" ({info['path']})"
        if before is not None:
            text += f", loss {before:.4f} -> {after:.4f}"
        if self.pending is not None:
            text += (f", on plateau at the eval of batch {self.pending} (improved "
                     f"{self.record['plateau_improvement']:.4f} over {self.plateau.describe()})")
        self.record["event"] = announce(logger, self.name, self.record["batch"], text)

    def run_events(self) -> list[dict[str, Any]]:
        return [self.record["event"]] if "event" in self.record else []

    def _probe(self, state: State) -> float | None:
        """Loss of the model on (one microbatch of) the last training batch, averaged over ranks."""
        if self._batch is None:
            return None
        model = composer_model(state)
        rows = state.device_train_microbatch_size if isinstance(state.device_train_microbatch_size, int) else 1
        batch = select_rows(self._batch, rows)
        mean = batch_mean_loss(model, batch, state.device, state.precision, state.precision_config)
        loss = state.device.tensor_to_device(torch.tensor([mean], dtype=torch.float32))
        dist.all_reduce(loss, reduce_operation="SUM")
        return float(loss.item()) / dist.get_world_size()

    # -- plan -------------------------------------------------------------------------------
    def plan_events(self, now: Now, batch: int, model: nn.Module, record: dict[str, Any]) -> list[dict[str, Any]]:
        """``composer-growth plan``: grow ``model`` as the run will, at the first batch end where it is due."""
        if record.get("fired") or self.at is None or now(self.at.unit) < float(self.at.value):
            return []
        record["fired"] = True
        self._after(model, self._op(model))
        event = {"event": self.name, "batch": batch}
        if self.plateau is not None:
            event["text"] = f"on plateau ({self.plateau.describe()}), at the latest by batch {batch}"
        return [event]

    def plan_pending(self, record: dict[str, Any], batch: int) -> list[dict[str, Any]]:
        """``composer-growth plan``: a growth that waits on a plateau with no ``at`` within the run."""
        if record.get("fired") or self.plateau is None:
            return []
        return [{"event": self.name, "batch": None, "pending": True,
                 "text": f"on plateau ({self.plateau.describe()}), not by an `at` within the run"}]

    # -- resume -----------------------------------------------------------------------------
    def replay(self, state: State, saved: dict[str, Any]) -> None:
        """Called before a checkpoint's weights load: redo the recorded growth."""
        if saved.get("applied") and not self.applied:
            grow(state, self._op, self._after, self._local)
            self.applied = True

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()  # Composer's base: {'repr': ...}
        out.update(self.record, applied=self.applied)
        if self.plateau is not None:
            out.update(plateau=self.plateau.state_dict(), pending=self.pending)
        return out

    def restore(self, state: dict[str, Any]) -> None:
        self.applied = bool(state.get("applied", False))
        self.record = {k: v for k, v in state.items() if k not in ("applied", "repr", "plateau", "pending")}
        if self.plateau is not None:
            self.plateau.load_state_dict(state.get("plateau"))
            self.pending = None if state.get("pending") is None else int(state["pending"])


@register_algorithm("stack_layers")
class StackLayers(_Growth):
    """Depth growth: repeat the stack (G_stack), an explicit source list, or append/prepend blocks.

    Args:
        at: when to grow (``"0.25dur"``, ``"2000ba"``, ``"1e8tok"``, ...); with ``trigger_plateau``, the
            latest time to grow (default: none; without it, ``"0.25dur"``).
        mode: ``repeat`` | ``explicit`` | ``append`` | ``prepend``.
        times: how many copies of the stack (``repeat``).
        source_layers: source index of each new layer (``explicit``).
        num_new: layers to add (``append`` / ``prepend``).
        init: ``copy`` | ``function_preserving`` | ``random``.
        trunk: ``train`` (the layers that existed before train as they did), ``frozen`` (they stop
            training) or ``lora`` (they train only through LoRA adapters: those that carry one keep it,
            the others get one of rank ``lora_rank``; merge them with
            ``composer_growth.functional.merge_lora`` before an HF export). New layers are plain copies
            of their sources (adapters folded in) and train. Several stacks: one StackLayers each (a
            list under ``stack_layers`` in a recipe); see :mod:`composer_growth.algorithms.stacking`.
        lora_rank, lora_alpha: the adapters of ``trunk: lora`` (alpha defaults to the rank).
        stack_lora: give the new stacks their own LoRA adapters on their linear layers (their base
            weights freeze; e.g. for ``lora_merge`` to fold in): a rank, or a list of ranks, one per
            new stack. A new stack is one copy of the stack in ``repeat`` mode (``times - 1`` of
            them), else all new layers together. ``trunk: frozen`` freezes the trunk's adapters too.
        stack_lora_pattern: with one rank: ``constant`` (every new stack that rank) or
            ``increasing`` (the i-th new stack, in depth order, ``i`` x the rank).
        stack_lora_alpha: the new stacks' adapters' alpha (default: each one's rank).
        seed: seed of ``random`` init.
        probe_loss: log the loss on the last batch right before and right after the growth.
        trigger_plateau: ``{window, min_delta}``: grow at the batch end after the eval where the eval
            loss improved by less than ``min_delta`` over the last ``window`` (nats, or a share like
            ``"10%"`` of the largest improvement over one window so far; see
            :mod:`composer_growth.algorithms.plateau`).
        monitor: the eval metric the plateau is judged on (default ``metrics/eval/LanguageCrossEntropy``).
    """

    name = "stack_layers"
    repeatable = True

    def __init__(self, at: Any = None, mode: str = "repeat", times: int = 2, source_layers: list[int] | None = None,
                 num_new: int | None = None, init: str = "copy", trunk: str = "train", lora_rank: int = 8,
                 lora_alpha: float | None = None, stack_lora: int | list[int] | None = None,
                 stack_lora_pattern: str = "constant", stack_lora_alpha: float | None = None, seed: int = 0,
                 probe_loss: bool = True, trigger_plateau: Any = None, monitor: str = DEFAULT_MONITOR):
        super().__init__(at, probe_loss, trigger_plateau, monitor, default_at="0.25dur")
        self.spec = StackSpec(mode=mode, times=times, source_layers=source_layers, num_new=num_new, init=init,
                              trunk=trunk, lora_rank=lora_rank, lora_alpha=lora_alpha, stack_lora=stack_lora,
                              stack_lora_pattern=stack_lora_pattern, stack_lora_alpha=stack_lora_alpha, seed=seed)
        self.mode, self.trunk = mode, trunk
        self.stack_lora_ranks = self.spec.stack_lora_ranks

    def _check_model_config(self, config: Any) -> None:
        self.spec.check_model_config(config)

    def validate_run(self, facts: RunFacts) -> None:
        super().validate_run(facts)
        if facts.has_recipe and self.trunk == "lora" and facts.peft is not None:
            raise ConfigError("trunk", self.trunk, "'lora' needs a model without model.peft adapters")

    def _op(self, model: nn.Module):
        return self.spec.op(model)

    def _after(self, model: nn.Module, mapping) -> None:
        self.spec.after(model, mapping)

    @property
    def _local(self):
        return self.spec.local


@register_algorithm("widen_mlp")
class WidenMLP(_Growth):
    """Width growth (Net2WiderNet) of every MLP by ``factor``, function-preserving when ``noise_std`` is 0.

    Args:
        at: when to grow; with ``trigger_plateau``, the latest time (default: none; without it, ``"0.5dur"``).
        factor: new MLP width / old (> 1).
        noise_std: gaussian noise on the new units' input weights, to break symmetry.
        seed: seeds the choice of replicated units and the noise (the same on every rank).
        probe_loss: log the loss on the last batch right before and right after the growth.
        trigger_plateau, monitor: as ``StackLayers``'.
    """

    name = "widen_mlp"
    repeatable = True

    def __init__(self, at: Any = None, factor: float = 2.0, noise_std: float = 0.0, seed: int = 0,
                 probe_loss: bool = True, trigger_plateau: Any = None, monitor: str = DEFAULT_MONITOR):
        super().__init__(at, probe_loss, trigger_plateau, monitor, default_at="0.5dur")
        check_number(factor, "factor", above=1)
        check_number(noise_std, "noise_std", minimum=0)
        check_int(seed, "seed")
        self.factor, self.noise_std, self.seed = float(factor), float(noise_std), seed

    def _check_model_config(self, config: Any) -> None:
        family = family_of(getattr(config, "model_type", None), key="model.family")
        parent = family.intermediate_key.rpartition(".")[0]
        check(not parent or isinstance(config_get(config, parent), dict), "model", type(config).__name__,
              f"its config has no '{parent}' to record the MLP width in (e.g. transformers' MptConfig fixes its "
              "MLP at 4x the width; llm-foundry's MPTConfig has it)")

    def _op(self, model: nn.Module):
        return widen_mlp(model, self.factor, noise_std=self.noise_std, seed=self.seed)

    @property
    def _local(self):
        return functools.partial(widen_local, factor=self.factor, noise_std=self.noise_std, seed=self.seed)
