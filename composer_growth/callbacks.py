"""Callbacks the recipes switch on by name."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_growth.algorithms.base import SuiteAlgorithm
from composer_growth.registry import register_callback


def _suite(state: State) -> list[SuiteAlgorithm]:
    return [a for a in state.algorithms or () if isinstance(a, SuiteAlgorithm)]


@register_callback("run_summary")
class RunSummary(Callback):
    """Keeps each eval's loss and, at the end of ``fit``, prints a one-screen summary.

    Its record (evals, wall time) is saved in checkpoints, so a resumed run reports the
    whole run. ``path`` also writes the summary as JSON (rank 0).
    """

    def __init__(self, path: str | None = None, eval_label: str = "eval", metric: str = "LanguageCrossEntropy"):
        self.path = path
        self.eval_label = eval_label
        self.metric = metric
        self.evals: list[dict[str, float]] = []
        self.wall_seconds = 0.0
        self._t0: float | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._t0 = time.perf_counter()

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = state.eval_metrics.get(self.eval_label, {})
        if self.metric not in metrics:
            return
        loss = float(metrics[self.metric].compute())
        entry = {"batch": int(state.timestamp.batch), "tokens": int(state.timestamp.token), "loss": loss}
        if self.evals and self.evals[-1]["batch"] == entry["batch"]:
            self.evals[-1] = entry
        else:
            self.evals.append(entry)

    def _elapsed(self) -> float:
        return self.wall_seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def summary(self, state: State) -> dict[str, Any]:
        first = self.evals[0]["loss"] if self.evals else None
        last = self.evals[-1]["loss"] if self.evals else None
        return {
            "run_name": state.run_name,
            "batches": int(state.timestamp.batch),
            "samples": int(state.timestamp.sample),
            "tokens_trained": int(state.timestamp.token),
            "wall_seconds": round(self._elapsed(), 2),
            "first_eval_loss": first,
            "last_eval_loss": last,
            "evals": list(self.evals),
            "train_loss": {k: float(v) for k, v in (state.total_loss_dict or {}).items()},
            "events": sorted((e for a in _suite(state) for e in a.run_events()), key=lambda e: e["batch"]),
            "final_params": int(sum(p.numel() for p in state.model.parameters())),
            "algorithms": self._sections(state),
        }

    @staticmethod
    def _sections(state: State) -> dict[str, Any]:
        """What algorithms with a ``run_summary()`` report: a title, console lines and JSON-able records."""
        out = {}
        for alg in _suite(state):
            section = alg.run_summary()
            if section is not None:
                out[section["title"]] = section
        return out

    def fit_end(self, state: State, logger: Logger) -> None:
        info = self.summary(state)
        rank = dist.get_global_rank()
        if self.path and "{rank}" in self.path:  # one file per rank, e.g. to compare ranks
            self._write(self.path.format(rank=rank), info)
        if rank != 0:
            return
        lines = [
            "",
            f"== composer-growth run summary: {info['run_name']} ==",
            f"  batches trained   {info['batches']}",
            f"  tokens trained    {info['tokens_trained']:,}",
            f"  wall time         {info['wall_seconds']:.1f} s",
        ]
        if info["first_eval_loss"] is not None:
            lines += [
                f"  first eval loss   {info['first_eval_loss']:.4f}  (batch {self.evals[0]['batch']})",
                f"  last eval loss    {info['last_eval_loss']:.4f}  (batch {self.evals[-1]['batch']})",
                f"  improvement       {info['first_eval_loss'] - info['last_eval_loss']:.4f} nats",
            ]
        lines.append(f"  final params      {info['final_params']:,}")
        if info["events"]:
            lines.append("  events")
            lines += [f"    batch {e['batch']:>7}  {e['name']}: {e['text']}" for e in info["events"]]
        for title, section in info["algorithms"].items():
            lines += [f"  {title}:", *section["lines"]]
        print("\n".join(lines), flush=True)
        if self.path and "{rank}" not in self.path:
            self._write(self.path, info)

    @staticmethod
    def _write(path: str, info: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(info, f, indent=2)

    def state_dict(self) -> dict[str, Any]:
        # a tuple: a sharded checkpoint stores it whole (it would flatten a list of dicts into keys per
        # eval, which the load template of a resumed run, built before its evals are back, lacks)
        return {"evals": tuple(dict(e) for e in self.evals), "wall_seconds": self._elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evals = [dict(e) for e in state.get("evals", [])]
        self.wall_seconds = float(state.get("wall_seconds", 0.0))
        self._t0 = None


@register_callback("resume_rng")
class ResumeRng(Callback):
    """A run resumed mid-epoch draws the random numbers (dropout's masks) the run it resumes drew.

    Composer restores a checkpoint's RNG states at an epoch's start or while it spins the train loader,
    not when the train dataset resumes itself mid-epoch (a ``StreamingDataset``): this callback loads
    them there, right before the first batch is drawn
    (:func:`~composer_growth.algorithms.composer_hooks.restore_skipped_rng`). Recipe runs have one;
    the suite's algorithms add one to a Trainer that has none.
    """

    def init(self, state: State, logger: Logger) -> None:
        from composer_growth.algorithms.composer_hooks import keep_checkpoint_rng

        keep_checkpoint_rng(state)

    def before_dataloader(self, state: State, logger: Logger) -> None:
        from composer_growth.algorithms.composer_hooks import restore_skipped_rng

        restore_skipped_rng(state)
