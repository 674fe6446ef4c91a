"""The context-length schedule's callbacks: evaluation at the phase's length, and the phase-end export.

Both read the schedule's current phase through its public surface, :class:`PhaseSchedule` (``phase``,
``trained_phases``, ``phase_ending``, the eval and export options); they do not import the schedule.
:class:`~composer_growth.algorithms.context_schedule.ContextLengthSchedule` puts them into the
Trainer's callbacks at ``Event.INIT`` (before the checkpoint saver, so a checkpoint written at a
phase end records the phase as exported); a Composer script lists only the algorithm (or also
``schedule.callbacks`` among its callbacks: the algorithm adds only those not listed yet).
Their state is the schedule's: a resumed run continues with what its checkpoint recorded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Protocol

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_growth.algorithms.phases import Phase
from composer_growth.algorithms.surgery import gather_hf_state_dict
from composer_growth.export import save_config, save_pretrained
from composer_growth.data.phased import loader_len, sample_length
from composer_growth.functional.batch import batch_seq_length, set_batch_sequence_length
from composer_growth.functional.lora import base_state_dict, merged_state_dict, save_adapter
from composer_growth.functional.loss import loss_sum
from composer_growth.functional.rope import max_addressable_positions
from composer_growth.functional.sharding import reshard
from composer_growth.unwrap import peft_model, unwrap_composer, unwrap_hf
from composer_growth.waiting import wait_for_all



class PhaseSchedule(Protocol):
    """What the callbacks read of a context schedule (``ContextLengthSchedule`` has it): its current phase,
    the phases trained so far, whether the phase ends with this batch, and its eval and export options."""

    mode: str
    eval_labels: tuple[str, ...]
    eval_split: str
    eval_batches: int
    save_folder: str | None
    save_checkpoints: bool
    export_hf: bool
    export_base_weights: bool
    verbose: bool

    @property
    def phase(self) -> Phase: ...

    @property
    def trained_phases(self) -> list[Phase]: ...

    @property
    def data_length(self) -> int | None: ...

    def phase_ending(self, state: State) -> bool: ...

    def mark_exported(self, name: str) -> None: ...

    def warn_once(self, text: str) -> None: ...


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 80.0))


class PhaseLengthEval(Callback):
    """Evaluates at the current phase's length, and measures perplexity at every phase length so far.

    The evaluators named by the schedule's ``eval_labels`` run on the eval split of the phase's
    dataset when it has one (else on their own batches), cut to the phase's length; the loss is
    logged as ``context/ppl/<length>``. :meth:`length_perplexities` is what a phase end logs.
    """

    def __init__(self, schedule: PhaseSchedule):
        self.schedule = schedule
        self._active = False
        self._loaders: dict[str, Any] = {}

    def _evaluator(self, state: State, label: str | None = None) -> Any:
        for ev in state.evaluators:
            if (label is None and ev.label in self.schedule.eval_labels) or ev.label == label:
                return ev
        return None

    def _loader(self, state: State, phase: Phase) -> Any:
        """A loader over the eval split of a phase's dataset (None: the phase has none)."""
        split = self.schedule.eval_split
        if phase.dataset is None or not os.path.isdir(os.path.join(phase.dataset, split)):
            return None
        from composer_growth.data.loaders import build_lm_dataloader
        from composer_growth.data.prepare import read_manifest

        if phase.dataset not in self._loaders:
            manifest = read_manifest(phase.dataset)
            length = int(manifest["seq_len"]) if manifest else phase.seq_length
            ev = self._evaluator(state)
            base = ev.dataloader.dataloader if ev is not None else None
            rows = getattr(base, "batch_size", None) or 1
            eval_len = sample_length(base) or self.schedule.data_length or length
            self._loaders[phase.dataset] = build_lm_dataloader(
                phase.dataset, split, max(1, rows * eval_len // length), shuffle=False,
                seed=state.rank_zero_seed, num_workers=0, drop_last=False)
        return self._loaders[phase.dataset]

    def eval_start(self, state: State, logger: Logger) -> None:
        label = state.dataloader_label
        self._active = label in self.schedule.eval_labels
        if not self._active:
            return
        loader = self._loader(state, self.schedule.phase)
        if loader is None:
            return
        ev = self._evaluator(state, label)
        subset = getattr(ev, "subset_num_batches", None) if ev is not None else None
        current, whole = state.dataloader_len, loader_len(ev.dataloader.dataloader) if ev is not None else None
        if not (isinstance(subset, int) and subset > 0):
            subset = int(current) if current is not None and whole is not None and int(current) < whole else -1
        length = loader_len(loader)
        if subset > 0 and length is not None:
            subset = min(subset, length)
        state.set_dataloader(loader, label, subset)

    def eval_batch_start(self, state: State, logger: Logger) -> None:
        if not self._active or not isinstance(state.batch, Mapping):
            return
        phase = self.schedule.phase
        full = batch_seq_length(state.batch)
        if full > phase.seq_length:
            state.batch = set_batch_sequence_length(state.batch, phase.seq_length, self.schedule.mode)
        elif full < phase.seq_length:
            self.schedule.warn_once(f"ContextLengthSchedule: phase '{phase.name}' evaluates {full}-token sequences, "
                                    f"shorter than its {phase.seq_length}: give it a dataset with a "
                                    f"'{self.schedule.eval_split}' split")

    def eval_end(self, state: State, logger: Logger) -> None:
        if not self._active:
            return
        self._active = False
        metric = state.eval_metrics.get(state.dataloader_label, {}).get("LanguageCrossEntropy")
        if metric is not None:
            length = self.schedule.phase.seq_length
            logger.log_metrics({f"context/ppl/{length}": perplexity(float(metric.compute())),
                                "context/eval_seq_len": length})

    def _mean_loss(self, state: State, loader: Any, length: int) -> float | None:
        def prepare(batch: Any) -> Any:
            return set_batch_sequence_length(batch, length, self.schedule.mode)

        total = loss_sum(unwrap_composer(state.model), loader, self.schedule.eval_batches, prepare,
                         state.precision, state.precision_config, device=state.device)
        t = state.device.tensor_to_device(total)
        dist.all_reduce(t, reduce_operation="SUM")
        loss, count = (float(x) for x in t.cpu())
        return loss / count if count else None

    def length_perplexities(self, state: State, logger: Logger) -> dict[int, float]:
        """Perplexity at every phase length up to the current one, on that phase's eval data."""
        out: dict[int, float] = {}
        if self.schedule.eval_batches <= 0:
            return out
        ev = self._evaluator(state)
        base = ev.dataloader.dataloader if ev is not None else None
        for phase in self.schedule.trained_phases:
            loader = self._loader(state, phase) or base
            if loader is None:
                continue
            loss = self._mean_loss(state, loader, phase.seq_length)
            if loss is not None:
                out[phase.seq_length] = perplexity(loss)
        if out:
            logger.log_metrics({f"context/phase_end_ppl/{n}": v for n, v in out.items()})
        return out


class PhaseExport(Callback):
    """At each phase end, writes ``<save_folder>/<phase name>/``: a Composer checkpoint and an HF export
    (weights, the phase's config, the tokenizer; LoRA adapters in ``adapter/`` with the base weights and a
    merged model) that ``from_pretrained`` loads with its rope config, and ``phase.json``."""

    def __init__(self, schedule: PhaseSchedule, evaluation: PhaseLengthEval):
        self.schedule, self.evaluation = schedule, evaluation

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.schedule.phase_ending(state):
            self._phase_end(state, logger)

    def _phase_end(self, state: State, logger: Logger) -> None:
        from composer.utils import format_name_with_dist
        from composer.utils.checkpoint import save_checkpoint

        schedule, phase = self.schedule, self.schedule.phase
        ppl = self.evaluation.length_perplexities(state, logger)
        schedule.mark_exported(phase.name)  # before saving: the checkpoint records this phase as done
        if schedule.save_folder is None:
            return
        if "://" in schedule.save_folder:
            schedule.warn_once(f"ContextLengthSchedule: save_folder {schedule.save_folder} is remote; phase exports "
                               "are written to local folders only")
            return
        folder = os.path.join(format_name_with_dist(schedule.save_folder, state.run_name), phase.name)
        os.makedirs(folder, exist_ok=True)
        if schedule.save_checkpoints:
            save_checkpoint(state, os.path.join(folder, "checkpoint.pt"))
        if schedule.export_hf:
            full = self._gather(state) if state.fsdp_enabled else None  # all ranks gather; rank 0 writes
            if dist.get_global_rank() == 0:
                self._export_hf(state, phase, folder, ppl, full)
        wait_for_all()  # rank 0's export may outlast dist_timeout
        logger.log_metrics({"context/exported_phase": phase.index})
        if schedule.verbose and dist.get_global_rank() == 0:
            print(f"context_length_schedule: phase '{phase.name}' done at {state.timestamp.batch}; "
                  f"saved {folder}" + (f"; perplexity {', '.join(f'{n}: {v:.2f}' for n, v in ppl.items())}"
                                       if ppl else ""), flush=True)

    @staticmethod
    def _gather(state: State) -> dict | None:
        """The sharded model's full weights for the export (collective): adapters injected mid-run
        (``lora_merge`` ``start_at``, ``stack_lora``) folded in, as without FSDP."""
        from peft.tuners.lora import LoraLayer

        hf = unwrap_hf(state.model)
        if peft_model(state.model) is None and any(isinstance(m, LoraLayer) for m in hf.modules()):
            reshard(unwrap_composer(state.model))  # an eval's no_grad forward leaves the root unsharded
            return merged_state_dict(hf)  # gathered to rank 0's CPU only, merged there
        return gather_hf_state_dict(state.model)

    def _export_hf(self, state: State, phase: Phase, folder: str, ppl: dict[int, float],
                   full: dict | None = None) -> None:
        hf = unwrap_hf(state.model)
        peft = peft_model(state.model)
        if peft is None:  # adapters injected mid-run (lora_merge start_at, trunk: lora) are merged in
            save_pretrained(hf, folder, state_dict=full if full is not None else merged_state_dict(hf))
        elif state.fsdp_enabled:
            self.schedule.warn_once("ContextLengthSchedule: no HF export of LoRA adapters under FSDP (use the phase's "
                                    "Composer checkpoint)")
            return
        else:
            if self.schedule.export_base_weights:
                save_pretrained(hf, folder, state_dict=base_state_dict(hf))
            else:
                save_config(hf, folder)
            save_adapter(peft, os.path.join(folder, "adapter"))
            # and one plain model with every adapter folded in, which `from_pretrained` loads alone
            save_pretrained(hf, os.path.join(folder, "merged"), state_dict=merged_state_dict(hf))
        tokenizer = getattr(unwrap_composer(state.model), "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        reach = max_addressable_positions(hf.config)
        with open(os.path.join(folder, "phase.json"), "w") as f:
            json.dump({**phase.summary(), "index": phase.index, "batch": int(state.timestamp.batch),
                       "tokens": int(state.timestamp.token), "perplexity": {str(k): v for k, v in ppl.items()},
                       "max_addressable_positions": None if math.isinf(reach) else reach,
                       "lora": peft is not None}, f, indent=2)
