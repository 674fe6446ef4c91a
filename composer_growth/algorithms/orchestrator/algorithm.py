"""Loss-triggered orchestration: an ordered schedule of operations, each fired by the eval loss or a timeout.

A schedule is a list of operations, run in order. The next one fires when the monitored eval
loss drops below its ``trigger_loss`` or stops improving (``trigger_plateau``, counted from the last
operation that fired; see :mod:`composer_growth.algorithms.plateau`), both judged right after each
eval, or when its ``max_wait`` has passed since the last operation fired (judged at the end of every
batch). With
``reevaluate`` the loss is measured again right after the operation (on the monitored
evaluator's batches), and the next trigger is judged on it at once, so operations can cascade
at one batch; without it the next trigger waits for the next eval.

Every operation is one entry of :data:`~composer_growth.algorithms.orchestrator.ops.OPS` (name ->
:class:`~composer_growth.algorithms.orchestrator.ops.OpKind`), which acts on the run through the
:class:`~composer_growth.algorithms.orchestrator.ops.RunContext` this Algorithm passes it; the
schedule is read by :mod:`~composer_growth.algorithms.orchestrator.schedule`.

Ranks agree: rank 0 decides that an operation fires and broadcasts it; every rank applies it at
the same batch. A checkpoint holds the fired operations, the batch of each, and the settings
they changed; a resumed run replays the architecture operations before the weights load and
continues as the uninterrupted run would.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from composer.core import Event, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from composer_growth.algorithms.base import SuiteAlgorithm
from composer_growth.algorithms.composer_hooks import install_replay_hook
from composer_growth.algorithms.lr import UNIT_SUFFIX, RestartableSchedule, restartable_schedules
from composer_growth.algorithms.orchestrator.ops import (LR_SCHEDULE, LR_WARMUP, ROWS_LOADER, STEP_TIME, RunContext,
                                                         Skip, apply_eval_settings, batch_intervals)
from composer_growth.algorithms.orchestrator.report import fired_block, plan_event, run_summary
from composer_growth.algorithms.orchestrator.schedule import DEFAULT_MONITOR, Op, load_schedule, parse_monitor, parse_op
from composer_growth.algorithms.surgery import check_recipe_sharding, check_supported
from composer_growth.errors import ConfigError, check, check_flag
from composer_growth.families import FAMILIES, family_of
from composer_growth.functional.loss import metric_value
from composer_growth.functional.lora import lora_targets
from composer_growth.registry import register_algorithm
from composer_growth.runfacts import RunFacts, check_at_fit_start, peft_key
from composer_growth.timeutil import elapsed, parse_time
from composer_growth.unwrap import composer_model

log = logging.getLogger(__name__)


def eval_metric(state: State, label: str, metric_name: str) -> float | None:
    """The monitored eval metric measured now, as the Trainer's eval would: the evaluator's batches
    (its ``subset_num_batches``), the model's ``eval_forward`` and ``update_metric``, synced over ranks,
    with the metric and every batch on the model's device."""
    evaluator = next((ev for ev in state.evaluators if ev.label == label), None)
    metrics = state.eval_metrics.get(label, {})
    if evaluator is None or metric_name not in metrics:
        return None
    metric = copy.deepcopy(metrics[metric_name])
    metric.reset()
    spec = evaluator.dataloader
    limit = evaluator.subset_num_batches
    return metric_value(composer_model(state), metric, spec.dataloader, limit if isinstance(limit, int) else None,
                        prepare=spec.batch_transforms, after_device=spec.microbatch_transforms, device=state.device,
                        precision=state.precision, precision_config=state.precision_config)


@register_algorithm("orchestrator")
class Orchestrator(SuiteAlgorithm):
    """Fire an ordered schedule of hyperparameter, architecture and LoRA operations on eval-loss thresholds.

    Args:
        schedule: a list of operations, or the path of a JSON / YAML file holding one. Each is a
            mapping: ``name`` (a key of :data:`OPS`), ``value``, ``trigger_loss`` (fire when the
            monitored loss drops below it; null: only a timeout), ``trigger_plateau``
            (``{window, min_delta}``: fire when the loss improved by less than ``min_delta`` over the
            last ``window``; ``min_delta`` in nats or a share like ``"10%"`` of the largest improvement
            over one window so far), ``max_wait_iters`` (batches) or
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
        self._schedules: list[RestartableSchedule] = []  # the recipe's LR schedules (reset / warmup ops)
        self.run_facts: RunFacts | None = None  # what validate_run checked the options against

    @property
    def next_index(self) -> int:
        return len(self.fired)

    def _needing(self, need: str) -> list[Op]:
        """The ops that need ``need`` from the run (:attr:`OpKind.needs`)."""
        return [op for op in self.ops if need in op.kind.needs]

    def _next_plateau(self):
        """The plateau trigger of the next op (None: it has none, or every op fired)."""
        return self.ops[self.next_index].trigger_plateau if self.next_index < len(self.ops) else None

    def _groups(self, group: str) -> list[Op]:
        return [op for op in self.ops if op.kind.group == group]

    def _surgery(self) -> list[Op]:
        """The ops that change the model through surgery, architecture ones first."""
        ops = [op for op in self.ops if op.kind.surgery]
        return [op for op in ops if op.kind.group == "architecture"] + [op for op in ops if op.kind.group != "architecture"]

    def _context(self, state: State) -> RunContext:
        """What an operation may read and change in the run."""
        return RunContext(state, self.settings, self._rows_loader, self._schedules)

    # ------------------------------------------------------------------ validation

    def validate_run(self, facts: RunFacts) -> None:
        """Check the schedule against the run and the recipe before anything is built."""
        self.run_facts = facts
        timed = self._needing(STEP_TIME)
        if timed and facts.max_duration.unit == TimeUnit.EPOCH:
            raise ConfigError(f"schedule[{timed[0].index}].name", timed[0].name, "needs max_duration in ba, tok or sp")
        if not facts.has_recipe:
            return
        self._check_batches(facts.rows_per_device, facts.microbatch, facts.world_size)
        arch = self._surgery()
        surgery = arch + self._groups("lora")
        if surgery:
            check_recipe_sharding(facts.parallelism, f"schedule[{surgery[0].index}].name={surgery[0].name!r}")
        if arch and facts.model_family is not None and facts.model_family not in FAMILIES:
            op = arch[0]
            raise ConfigError(f"schedule[{op.index}].name", op.name,
                              f"needs a model family in the table ({', '.join(sorted(FAMILIES))}), "
                              f"not {facts.model_family!r}")
        lora = self._groups("lora")
        if lora and facts.peft is None and not facts.adapters_later:
            raise ConfigError(f"schedule[{lora[0].index}].name", lora[0].name,
                              "needs a model with LoRA adapters (model.peft)")

    def _check_batches(self, rows: int, microbatch: Any, world: int) -> None:
        """Every batch or microbatch change of the schedule, in order, leaves whole rows on every rank."""
        mb = microbatch if isinstance(microbatch, int) else None
        for op in self.ops:
            rows, mb = op.kind.plan_batches(rows, mb, op.value, f"schedule[{op.index}].value", world)

    def _check_model(self, state: State) -> None:
        """What the live model must offer the schedule: a family in the table, LoRA adapters."""
        model = composer_model(state)
        for op in self._surgery():
            family_of(model, key=f"schedule[{op.index}].name={op.name!r}: model family")
        later = any(isinstance(a, SuiteAlgorithm) and a is not self and a.adds_adapters_later() for a in state.algorithms)
        for op in self._groups("lora") if not later else ():  # adapters added later: an op firing before is skipped
            targets = op.args.get("targets", op.kind.lora)
            try:
                lora_targets(model, targets)
            except ConfigError as e:
                if "has no LoRA adapters" in e.allowed:
                    raise ConfigError(f"schedule[{op.index}].name", op.name, f"needs LoRA adapters on {targets} "
                                      f"modules; the model has none: {peft_key(model)}, lora_merge.start_at or "
                                      "stack_layers.stack_lora add them") from None
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
                self._observe(state, loss)
            self._decide(state, logger, loss)

    def _fit_start(self, state: State, logger: Logger) -> None:
        check_at_fit_start(self, state)
        if not any(ev.label == self.label for ev in state.evaluators) and any(
                op.trigger_loss is not None or op.trigger_plateau is not None for op in self.ops):
            labels = ", ".join(ev.label for ev in state.evaluators) or "none"
            raise ConfigError("monitor", f"metrics/{self.label}/{self.metric}",
                              f"an evaluator of this Trainer (evaluators: {labels})")
        if self._groups("architecture") or self._groups("lora"):
            check_supported(state, "orchestrator")
        if self._needing(ROWS_LOADER):
            self._install_rows_loader(state)
            batch_intervals(state)  # a dur interval needs a sized train loader; the rows loader is not
        mb = self.settings.get("microbatch")
        if mb is not None:
            state.device_train_microbatch_size = mb
        rows = self._context(state).rank_rows()
        if rows is not None and self.next_index == 0:
            mb0 = state.device_train_microbatch_size
            try:
                self._check_batches(rows, None if state.auto_microbatching else mb0, dist.get_world_size())
            except ConfigError as e:
                raise ConfigError(e.key, e.value, e.allowed) from None
        if self._needing(LR_SCHEDULE):
            self._install_lr_schedule(state)
        apply_eval_settings(state, self.settings)

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
        op = self._needing(ROWS_LOADER)[0]
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
        """Find the recipe's restartable LR schedules; put back the restart and warmup a checkpoint holds."""
        from torch.optim.lr_scheduler import LambdaLR

        op = self._needing(LR_SCHEDULE)[0]
        schedules = restartable_schedules(state)
        if not schedules or len(schedules) < len(state.schedulers) or not all(
                isinstance(s, LambdaLR) for s in state.schedulers):
            names = ", ".join(type(s).__name__ for s in state.schedulers) or "none"
            raise ConfigError(f"schedule[{op.index}].name", op.name,
                              f"needs the recipe's scheduler, or a Composer scheduler (e.g. cosine_with_warmup) "
                              f"wrapped in composer_growth.algorithms.lr.RestartableSchedule, not {names}")
        for warm in self._needing(LR_WARMUP)[:1]:
            for schedule in schedules:
                if not schedule.has_warmup:
                    raise ConfigError(f"schedule[{warm.index}].name", warm.name,
                                      f"needs a scheduler with a warmup, not {type(schedule.schedule).__name__}")
        for schedule in schedules:
            schedule.restart(self.settings.get("schedule_start"))
            schedule.set_warmup(self.settings.get("warmup"))
        self._schedules = schedules

    # ------------------------------------------------------------------ deciding

    def _since(self, state: State, unit: TimeUnit) -> float:
        return elapsed(state, unit) - float(self.anchor[UNIT_SUFFIX[unit]])

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
            events.append(plan_event(op, batch))
            record["anchor"] = anchor = {u: now(u) for u in (TimeUnit.BATCH, TimeUnit.TOKEN, TimeUnit.SAMPLE,
                                                              TimeUnit.DURATION)}
            i = record["next"] = i + 1
        return events

    def plan_pending(self, record: dict[str, Any], batch: int) -> list[dict[str, Any]]:
        """``composer-growth plan``: the ops no timeout fires within the run (only a loss can)."""
        return [plan_event(op, batch, latest=False) for op in self.ops[record.get("next", 0):]]

    def _timeout_due(self, state: State) -> bool:
        """The next op's max_wait has passed (the Trainer's time is the same on every rank)."""
        if self.next_index >= len(self.ops):
            return False
        wait = self.ops[self.next_index].max_wait
        return wait is not None and self._since(state, wait.unit) >= float(wait.value)

    def _observe(self, state: State, loss: float) -> None:
        """Feed the next op's plateau the loss just measured (every rank: the loss is reduced over ranks)."""
        plateau = self.ops[self.next_index].trigger_plateau if self.next_index < len(self.ops) else None
        if plateau is not None:
            plateau.observe(elapsed(state, plateau.unit), loss)

    def _reason(self, state: State, loss: float | None) -> str | None:
        if self.next_index >= len(self.ops):
            return None
        op = self.ops[self.next_index]
        if loss is not None and op.trigger_loss is not None and loss < op.trigger_loss:
            return "loss"
        if loss is not None and op.trigger_plateau is not None and op.trigger_plateau.reached():
            return "plateau"
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
            did = op.kind.apply(self._context(state), op)
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
        elif reason == "plateau":
            record.update(plateau=op.trigger_plateau.describe(), improvement=op.trigger_plateau.improvement())
        else:
            record["waited"] = f"{since:g}{UNIT_SUFFIX[wait.unit]}"
        self.fired.append(record)
        if after is not None:  # the re-evaluated loss opens the next op's plateau window
            self._observe(state, after)
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
            print("\n".join(fired_block(self.ops, self.metric, record)), flush=True)
        return after

    # ------------------------------------------------------------------ summary

    def run_events(self) -> list[dict[str, Any]]:
        """The ops that fired and applied, as run events."""
        return [{"batch": int(r["batch"]), "name": "orchestrator", "text": f"{self.ops[r['index']].label()} ({r['did']})"}
                for r in self.fired if r["status"] == "applied"]

    def run_summary(self) -> dict[str, Any]:
        """One line per fired op for the run summary, and the records for its JSON."""
        return run_summary(self.ops, self.fired)

    # ------------------------------------------------------------------ resume

    def replay(self, state: State, saved: dict[str, Any]) -> None:
        """Before a checkpoint's weights load: redo its fired ops that change shapes or unsaved module state."""
        fired = saved.get("fired") or []
        for r in fired[self._replayed:]:
            i = int(r["index"])
            if i >= len(self.ops) or self.ops[i].name != r["name"]:
                raise ConfigError(f"schedule[{i}].name", self.ops[i].name if i < len(self.ops) else None,
                                  f"the checkpoint was written by a schedule with {r['name']!r} there")
            if r["status"] == "applied" and self.ops[i].kind.replay:
                self.ops[i].kind.apply(self._context(state), self.ops[i])
        self._replayed = len(fired)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()  # Composer's 'repr'
        out.update(fired=[dict(r) for r in self.fired], anchor=dict(self.anchor),
                   settings=copy.deepcopy(self.settings),
                   last_loss=list(self.last_loss) if self.last_loss else None,
                   plateau=self._next_plateau().state_dict() if self._next_plateau() else None,
                   loader=self._rows_loader.state_dict() if self._rows_loader is not None else self._loader_state)
        return out

    def restore(self, state: dict[str, Any]) -> None:
        self.fired = [dict(r) for r in state.get("fired", [])]
        self.anchor = dict(state.get("anchor", self.anchor))
        self.settings = copy.deepcopy(state.get("settings", {}))
        last = state.get("last_loss")
        self.last_loss = (int(last[0]), float(last[1])) if last else None
        if self._next_plateau() is not None:
            self._next_plateau().load_state_dict(state.get("plateau"))
        self._loader_state = state.get("loader")
