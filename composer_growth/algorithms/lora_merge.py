"""ReLoRA during pre-training: ``LoraMergeRestart`` merges the LoRA adapters into the base weights and
restarts them every ``interval``, with the adapters' Adam moments pruned and a warm restart of the LR.

The model trains through peft LoRA adapters: from the recipe's ``model.peft`` block, or added at
``start_at`` after a full-rank warm start. Every ``interval`` after the adapters start (at the end
of a batch, after the optimizer step):

1. :func:`~composer_growth.functional.lora.merge_and_reinit_lora` adds each adapter's delta into
   its base weight and re-initialises the adapter (the model computes the same function; the
   parameters stay the same objects, so optimizer, schedulers and DDP stay valid);
2. :func:`~composer_growth.functional.lora.prune_optimizer_state` prunes the re-initialised
   adapters' Adam moments (``reset`` | ``random`` | ``magnitude``, ``ratio``);
3. the LR restarts: for ``restart_warmup`` after the merge it is the recipe schedule's LR times a
   linear ramp from 0 to 1 (ReLoRA's jagged cosine under a cosine schedule).

The re-initialisation draws from a CPU generator seeded with ``(seed, merge index)``: every rank
draws the same adapters, and a resumed run draws what the uninterrupted one did.

The ramp is this algorithm's factor on the LR the schedulers set
(:func:`composer_growth.algorithms.lr.set_lr_multiplier`, composed with the other algorithms'
factors), set at the end of every batch: Composer steps its ``LambdaLR`` schedulers before it
advances the timestamp, so a wrapped lambda would see the previous batch's time. The multiplied LR
is what the optimizer's param groups hold, so it is saved and restored with the optimizer in
checkpoints.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from composer.core import Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from composer_growth.algorithms.base import SuiteAlgorithm
from composer_growth.algorithms.composer_hooks import install_replay_hook
from composer_growth.algorithms.lr import set_lr_multiplier
from composer_growth.algorithms.surgery import check_recipe_sharding, check_supported, grow, is_fsdp2
from composer_growth.events import announce
from composer_growth.export import save_pretrained
from composer_growth.errors import ConfigError, check, check_flag, check_int, check_number
from composer_growth.families import FAMILIES, FULL_RANK_GROUPS, family_of, get_path, module_group
from composer_growth.functional.growth import ParamSource
from composer_growth.functional.lora import (LORA_GROUPS, PRUNE_MODES, add_lora, lora_target_modules, lora_targets,
                                             merge_and_reinit_lora, merged_state_dict, prune_optimizer_state)
from composer_growth.functional.sharding import full_state, reshard
from composer_growth.registry import register_algorithm
from composer_growth.runfacts import RunFacts, check_at_fit_start
from composer_growth.timeutil import elapsed, parse_time, reached, to_duration_fraction
from composer_growth.unwrap import composer_model, unwrap_hf
from composer_growth.waiting import wait_for_all

__all__ = ["LoraMergeRestart"]


def _check_full_rank(value: Any) -> None:
    ok = value is None or (isinstance(value, (list, tuple)) and len(set(value)) == len(value)
                           and all(isinstance(v, str) and v in FULL_RANK_GROUPS for v in value))
    check(ok, "full_rank", value, f"null (all: the reference's) or a list of distinct {', '.join(FULL_RANK_GROUPS)}")


def _check_targets(value: Any, key: str) -> None:
    ok = value is None or value in LORA_GROUPS or (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(t, str) for t in value))
    check(ok, key, value, f"null, one of {', '.join(LORA_GROUPS)}, or a non-empty list of module names")


@register_algorithm("lora_merge")
class LoraMergeRestart(SuiteAlgorithm):
    """ReLoRA: merge the LoRA adapters into the base weights and restart them every ``interval``.

    Args:
        interval: time between merges, counted from the start of the adapters (``"500ba"``,
            ``"0.1dur"``, ``"2e7tok"``, ...).
        targets: the adapters to merge (and, with ``start_at``, the modules to put adapters on): a
            group (``attention`` | ``mlp`` | ``embedding`` | ``all``) or a list of module names.
            Default: ``all`` when merging; for ``start_at``, ``model.peft.target_modules`` of the
            recipe, else ``all`` (every linear layer of the blocks).
        prune: ``reset`` | ``random`` | ``magnitude``: how the re-initialised adapters' Adam
            moments are pruned after each merge (one mask for all of a parameter's moments;
            ``magnitude`` ranks the entries by their first moment).
        ratio: the share of each adapter's moment entries ``random`` / ``magnitude`` zero, in [0, 1).
        restart_warmup: length of the linear LR ramp after each merge (``"0ba"``: none). The first
            batch after a merge runs at LR 0 (it refills the pruned moments), as Composer's own
            warmups start.
        start_at: time of the full-rank warm start's end: until then every parameter trains; then
            adapters go on (through ``surgery.grow``) and the base weights of the wrapped modules
            freeze. ``None``: the model has adapters from the start (``model.peft``).
        full_rank: the parameters outside the adapters that train at full rank next to them, from
            the first step (or on from ``start_at``): a list of ``embeddings`` | ``norms`` | ``head``
            (module paths from the family table); ``None``: all three, as the ReLoRA reference, less
            modules that already train through an adapter or a peft ``modules_to_save`` copy. Merges
            and the optimizer pruning leave them alone.
        rank, alpha, use_rslora, dropout: the adapters added at ``start_at`` (default: the recipe's
            ``model.peft`` ``r`` / ``lora_alpha`` / ``use_rslora`` / ``lora_dropout``, else rank 8,
            alpha = rank, no dropout).
        seed: seeds the re-initialisation of the adapters (with the merge index).
        export_folder: at the end of the run, rank 0 writes a plain HF model there with every
            adapter merged (``from_pretrained`` loads it), and the tokenizer.
    """

    def __init__(self, interval: Any = "0.25dur", targets: Any = None, prune: str = "magnitude", ratio: float = 0.9,
                 restart_warmup: Any = "0ba", start_at: Any = None, rank: int | None = None,
                 alpha: float | None = None, use_rslora: bool | None = None, seed: int = 0,
                 export_folder: str | None = None, full_rank: Any = None, dropout: float | None = None):
        self.interval: Time = parse_time(interval, "interval")
        check(self.interval.value > 0, "interval", interval, "a positive time")
        _check_targets(targets, "targets")
        check(prune in PRUNE_MODES, "prune", prune, f"one of {', '.join(PRUNE_MODES)}")
        check_number(ratio, "ratio", minimum=0, below=1)
        self.restart_warmup: Time = parse_time(restart_warmup, "restart_warmup")
        self.start_at: Time | None = None if start_at is None else parse_time(start_at, "start_at")
        if rank is not None:
            check_int(rank, "rank", minimum=1)
        if alpha is not None:
            check_number(alpha, "alpha", above=0, allowed="null or a number > 0")
        if use_rslora is not None:
            check_flag(use_rslora, "use_rslora", allowed="null, true or false")
        if dropout is not None:
            check_number(dropout, "dropout", minimum=0, below=1, allowed="null or a number in [0, 1)")
        _check_full_rank(full_rank)
        check_int(seed, "seed")
        check(export_folder is None or isinstance(export_folder, str), "export_folder", export_folder,
              "null or a folder path")
        if self.start_at is None:
            for key, value in (("rank", rank), ("alpha", alpha), ("use_rslora", use_rslora), ("dropout", dropout)):
                check(value is None, key, value, "only with start_at (adapters added mid-run)")
        self.targets = targets
        self.prune, self.ratio, self.seed = prune, float(ratio), seed
        self.rank, self.alpha, self.use_rslora, self.dropout = rank, alpha, use_rslora, dropout
        self.full_rank = None if full_rank is None else list(full_rank)
        self.export_folder = export_folder
        # set by validate_run from the recipe's model.peft when start_at adds the adapters
        self.defers_peft = False
        self._peft_targets: Any = None
        self.run_facts: RunFacts | None = None  # what validate_run checked the options against
        # run state (saved)
        self.started = self.start_at is None
        self.start_point = 0.0      # elapsed time (interval unit) at which the adapters started
        self.merges = 0
        self.last_merge: float | None = None  # elapsed time (restart_warmup unit) of the last merge
        self.history: list[dict[str, Any]] = []
        self.start_event: dict[str, Any] | None = None
        self._ramping = False

    def adds_adapters_later(self) -> bool:
        return self.enabled and self.start_at is not None and not self.started

    # -- options ----------------------------------------------------------------------------
    @property
    def merge_targets(self) -> Any:
        return "all" if self.targets is None else self.targets

    @property
    def add_targets(self) -> Any:
        if self.targets is not None:
            return self.targets
        return self._peft_targets if self._peft_targets is not None else "all"

    def _lora_args(self) -> dict[str, Any]:
        rank = self.rank if self.rank is not None else 8
        return {"rank": rank, "alpha": self.alpha if self.alpha is not None else rank,
                "use_rslora": bool(self.use_rslora), "dropout": float(self.dropout or 0.0)}

    # -- validation -------------------------------------------------------------------------
    def validate_run(self, facts: RunFacts) -> None:
        self.run_facts = facts
        max_duration = facts.max_duration
        for key, t in (("interval", self.interval), ("start_at", self.start_at)):
            frac = None if t is None else to_duration_fraction(t, max_duration)
            if frac is not None and frac >= 1:
                raise ConfigError(key, str(t), f"must fall before the end of the run (max_duration {max_duration})")
        if self.start_at is not None and self.start_at.unit == self.interval.unit:
            if float(self.start_at.value) + float(self.interval.value) >= _value_in(max_duration, self.interval.unit):
                raise ConfigError("interval", str(self.interval),
                                  f"no merge would happen between start_at {self.start_at} and the end of the run "
                                  f"(max_duration {max_duration})")
        if self.restart_warmup.unit == self.interval.unit and self.restart_warmup.value > self.interval.value:
            raise ConfigError("restart_warmup", str(self.restart_warmup), f"at most the interval ({self.interval})")
        if not facts.has_recipe:
            return
        check_recipe_sharding(facts.parallelism, "lora_merge")
        peft = facts.peft
        if self.start_at is None and peft is None:
            raise ConfigError("start_at", None, "the model has no LoRA adapters: give model.peft, or start_at to add "
                                                "them after a full-rank warm start")
        if self.start_at is not None and peft is not None:
            if peft.get("modules_to_save"):
                raise ConfigError("model.peft.modules_to_save", peft["modules_to_save"],
                                  "empty with lora_merge.start_at (the adapters it adds carry no modules_to_save "
                                  "copies): train those modules with lora_merge.full_rank")
            self.defers_peft = True  # the recipe's block describes the adapters added at start_at
            if self.rank is None:
                self.rank = peft.get("r", 8)
            if self.alpha is None:
                self.alpha = peft.get("lora_alpha")
            if self.use_rslora is None:
                self.use_rslora = bool(peft.get("use_rslora", False))
            if self.dropout is None:
                self.dropout = float(peft.get("lora_dropout", 0.0))
            self._peft_targets = peft.get("target_modules")
            _check_targets(self._peft_targets, "model.peft.target_modules")
        if facts.model_family in FAMILIES and facts.model_config is not None:
            self._check_on_meta_model(facts)

    def _check_on_meta_model(self, facts: RunFacts) -> None:
        """Resolve the targets on the run's model built on the meta device (no memory, no RNG)."""
        from composer_growth.functional.flops import meta_model

        model = meta_model(facts.model_config)
        if self.start_at is not None:
            add_lora(model, self.add_targets, **self._lora_args())
        else:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(**facts.peft), model)
        lora_targets(model, self.merge_targets)
        self.full_rank_parameters(model)  # model.peft's modules_to_save copies are on the meta model too

    # -- events -----------------------------------------------------------------------------
    _EVENTS = frozenset((Event.INIT, Event.FIT_START, Event.BATCH_END, Event.FIT_END))  # one hash, not 4 __eq__

    def match(self, event: Event, state: State) -> bool:
        return event in self._EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.INIT:
            model = composer_model(state)
            family_of(model, key="lora_merge: model family")
            if self.start_at is None:
                lora_targets(model, self.merge_targets)  # the adapters exist
                _train_in_optimizer(state, self.full_rank_parameters(model).values())
            else:
                lora_target_modules(model, self.add_targets)  # the modules to wrap exist
            install_replay_hook(state)
        elif event is Event.FIT_START:
            check_supported(state, "lora_merge")
            check_at_fit_start(self, state)
            if self.last_merge is not None:  # resumed mid-run: the ramp's factor, as the last batch end set it
                set_lr_multiplier(state, "lora_merge", self.ramp(state))
        elif event is Event.BATCH_END:
            if not self.started and self.start_at is not None and reached(state, self.start_at):
                self._start(state, logger)
            if self.started and self._merge_due(state):
                self._merge(state, logger)
            self._ramp_lr(state, logger)
        elif event is Event.FIT_END and self.export_folder is not None:
            self._export(state)

    def full_rank_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The parameters ``full_rank`` selects (by name, from the HF model); ``ConfigError`` where one of its
        modules holds a LoRA adapter or a ``modules_to_save`` copy, or names one of a tied embedding and head."""
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        hf = unwrap_hf(model)
        groups = list(FULL_RANK_GROUPS) if self.full_rank is None else self.full_rank
        out: dict[str, torch.nn.Parameter] = {}
        for group in groups:
            for path in module_group(hf, group):
                module = get_path(hf, path)
                if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
                    if self.full_rank is None:
                        continue  # the default leaves it to the adapter / the peft copy
                    how = "a LoRA adapter" if isinstance(module, LoraLayer) else "a peft modules_to_save copy"
                    raise ConfigError("full_rank", group, f"{path} already trains through {how}; leave {group} out")
                for name, p in module.named_parameters(prefix=path):
                    if all(p is not q for q in out.values()):
                        out[name] = p
        tied = self._tied(hf)
        if self.full_rank is not None and tied and ("embeddings" in groups) != ("head" in groups):
            raise ConfigError("full_rank", self.full_rank, "both embeddings and head, or neither: the model ties its "
                                                           "input embedding to its head (tie_word_embeddings)")
        return out

    @staticmethod
    def _tied(hf: torch.nn.Module) -> bool:
        inp, outp = hf.get_input_embeddings(), hf.get_output_embeddings()
        return inp is not None and outp is not None and outp.weight is inp.weight

    def _add_op(self, model: torch.nn.Module):
        hf = unwrap_hf(model)
        add_lora(hf, self.add_targets, **self._lora_args())
        if self.full_rank is not None:  # the groups left out of full_rank freeze with the wrapped base weights
            keep = {id(p) for p in self.full_rank_parameters(hf).values()}
            for group in FULL_RANK_GROUPS:
                for path in module_group(hf, group):
                    for p in get_path(hf, path).parameters():
                        p.requires_grad_(id(p) in keep)
        return _trainable_mapping(model)

    def _start(self, state: State, logger: Logger) -> None:
        info = grow(state, self._add_op)
        self.started = True
        self.start_point = elapsed(state, self.interval.unit)
        logger.log_metrics({"lora/started": int(state.timestamp.batch), "lora/trainable_params": info["trainable_after"]})
        self.start_event = announce(logger, "lora_merge", int(state.timestamp.batch),
                                    f"adapters on (full-rank warm start over): trainable params "
                                    f"{info['trainable_after']:,} of {info['params_after']:,}")

    def _merge_due(self, state: State) -> bool:
        return self.merge_due(self.start_point, self.merges, elapsed(state, self.interval.unit))

    def merge_due(self, start_point: float, merges: int, done: float) -> bool:
        """Whether merge ``merges + 1`` is due once ``done`` (interval unit) of the run is done."""
        return done >= start_point + (merges + 1) * float(self.interval.value)

    def plan_events(self, now, batch: int, model: torch.nn.Module, record: dict[str, Any]) -> list[dict[str, Any]]:
        """``composer-growth plan``: what happens at the end of batch ``batch`` (``record`` keeps the plan's state)."""
        events = []
        if not record.get("started", self.started) and _reached_by(now, self.start_at):
            add_lora(model, self.add_targets, **self._lora_args())
            record.update(started=True, start_point=now(self.interval.unit))
            events.append({"event": "lora_start", "batch": batch, "rank": self._lora_args()["rank"]})
        record.setdefault("started", self.started)
        if record["started"] and self.merge_due(record.get("start_point", 0.0), record.get("merges", 0),
                                                now(self.interval.unit)):
            record["merges"] = record.get("merges", 0) + 1
            record["last_merge"] = now(self.restart_warmup.unit)
            events.append({"event": "lora_merge", "batch": batch, "merge": record["merges"]})
        return events

    def plan_lr(self, now, record: dict[str, Any]) -> float:
        """``composer-growth plan``: the LR multiplier of the restart ramp (see :meth:`ramp`)."""
        last = record.get("last_merge")
        if last is None or self.restart_warmup.value == 0:
            return 1.0
        return min(1.0, max(0.0, (now(self.restart_warmup.unit) - last) / float(self.restart_warmup.value)))

    @torch.no_grad()
    def _merge(self, state: State, logger: Logger) -> None:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.merges)
        model = composer_model(state)
        reshard(model)  # FSDP2: the merge changes the shards in place
        fresh = merge_and_reinit_lora(model, self.merge_targets, generator=gen)
        zeroed = 0
        for opt in state.optimizers:
            with full_state(opt, fresh):  # FSDP2: prune the whole moments, as one process would
                zeroed += prune_optimizer_state(opt, fresh, self.prune, self.ratio, generator=gen)
        self.merges += 1
        self.last_merge = elapsed(state, self.restart_warmup.unit)
        record = {"batch": int(state.timestamp.batch), "tokens": int(state.timestamp.token),
                  "adapter_params": int(sum(p.numel() for p in fresh)), "pruned": int(zeroed),
                  "seconds": float(time.perf_counter() - t0)}
        self.history.append(record)
        logger.log_metrics({"lora/merges": self.merges, "lora/merge_batch": record["batch"],
                            "lora/pruned": record["pruned"], "lora/merge_seconds": record["seconds"]})
        record["event"] = announce(logger, "lora_merge", record["batch"],
                                   f"merge {self.merges}: {record['adapter_params']:,} adapter params restarted, "
                                   f"{record['pruned']:,} moments pruned, {record['seconds']:.2f} s")

    def run_events(self) -> list[dict[str, Any]]:
        return [dict(h["event"]) for h in self.history if "event" in h] + (
            [dict(self.start_event)] if self.start_event else [])

    def ramp(self, state: State) -> float:
        """The LR multiplier for the next batch: 0 -> 1 over ``restart_warmup`` after the last merge."""
        if self.last_merge is None or self.restart_warmup.value == 0:
            return 1.0
        since = elapsed(state, self.restart_warmup.unit) - self.last_merge
        return min(1.0, max(0.0, since / float(self.restart_warmup.value)))

    def _ramp_lr(self, state: State, logger: Logger) -> None:
        factor = self.ramp(state)
        if self.last_merge is None:
            return
        set_lr_multiplier(state, "lora_merge", factor)  # on the schedule's LR (else the LR before the first merge)
        if factor < 1.0 or self._ramping:
            logger.log_metrics({"lora/lr_ramp": factor})
        self._ramping = factor < 1.0

    def _export(self, state: State) -> None:
        hf = unwrap_hf(state.model)
        merged = None
        if is_fsdp2(state):  # every rank takes part in the gather to rank 0's CPU; rank 0 merges and writes
            reshard(composer_model(state))
            merged = merged_state_dict(hf)
        if dist.get_global_rank() == 0:
            os.makedirs(self.export_folder, exist_ok=True)
            save_pretrained(hf, self.export_folder, merged if merged is not None else merged_state_dict(hf))
            tokenizer = getattr(composer_model(state), "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.export_folder)
        wait_for_all()  # rank 0's export may outlast dist_timeout

    # -- resume -----------------------------------------------------------------------------
    def replay(self, state: State, saved: dict[str, Any]) -> None:
        """Called before a checkpoint's weights load: put on the adapters the saved run had added."""
        if saved.get("started") and not self.started:
            grow(state, self._add_op)
            self.started = True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "started": self.started, "start_point": self.start_point,
                "merges": self.merges, "last_merge": self.last_merge, "history": [dict(h) for h in self.history],
                "start_event": self.start_event}

    def restore(self, state: dict[str, Any]) -> None:
        self.started = bool(state.get("started", self.start_at is None))
        self.start_point = float(state.get("start_point", 0.0))
        self.merges = int(state.get("merges", 0))
        self.last_merge = state.get("last_merge")
        self.history = [dict(h) for h in state.get("history", [])]
        self.start_event = state.get("start_event")


def _reached_by(now, t: Time | None) -> bool:
    return t is not None and now(t.unit) >= float(t.value)


def _value_in(max_duration: Time, unit: TimeUnit) -> float:
    return float(max_duration.value) if max_duration.unit == unit else float("inf")


def _train_in_optimizer(state: State, params) -> None:
    """Make ``params`` train: ``requires_grad``, and in the optimizer's first param group where no group
    holds them (before DDP wraps the model, so its hooks cover them; a resumed run does the same
    before its optimizer state loads)."""
    params = list(params)
    for p in params:
        p.requires_grad_(True)
    for opt in state.optimizers[:1]:
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        opt.param_groups[0]["params"].extend(p for p in params if id(p) not in held)


def _trainable_mapping(model: torch.nn.Module) -> dict[str, ParamSource]:
    """The mapping after ``add_lora``: every parameter that still trains maps to itself; the adapters are
    fresh; the frozen base weights are left out, so the optimizer drops them and their state."""
    return {name: ParamSource(name) for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}
