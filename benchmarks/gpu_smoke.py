"""Smoke test of every algorithm: each recipe trained in turn in this one process, checked, timed.

    python3 -m composer.cli.launcher -n 1 benchmarks/gpu_smoke.py --out smoke.json yamls/gpu/gpu-*.yaml
    python3 -m composer.cli.launcher -n 1 benchmarks/gpu_smoke.py --out smoke.json --set device=cpu \\
        --set precision=fp32 yamls/gpu/gpu-warmup.yaml          # the same on a CPU (gloo)

``--set key=value`` overrides apply to every recipe. A recipe passes when its run trains every batch
of ``max_duration`` to a finite loss, on the recipe's device (CUDA for ``device: gpu``), precision and
attention, sharded by FSDP when the recipe asks for it (process group backend: NCCL on CUDA, gloo on
a CPU), and every algorithm of the suite in it reported at least one run event (a growth, a merge,
an op, the warmup's end, a phase change). A failing recipe does not stop the next.

``--out`` holds one entry per recipe, written after each: ``step``, ``result`` (pass / fail),
``seconds`` (the recipe's wall time, data and model building included), ``problems``, the facts
checked, the parameter counts at the start and end, the run events, the peak CUDA memory allocated
and reserved in the run (GiB, None on a CPU) and the peak allocated around each batch where the
model changed (a growth, a merge, an orchestrator op) and the batch before it. The exit status is 0
when every recipe passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from typing import Any

import torch
from composer.core import Callback
from composer.utils import dist

GiB = 2**30


def _memory() -> dict[str, float]:
    """Peak CUDA memory since the last call (GiB), then a new window; empty on a CPU."""
    if not torch.cuda.is_available():
        return {}
    out = {"peak_alloc_gib": torch.cuda.max_memory_allocated() / GiB,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
    torch.cuda.reset_peak_memory_stats()
    return out


def _suite(state) -> list:
    from composer_growth.algorithms.base import SuiteAlgorithm

    return [a for a in state.algorithms if isinstance(a, SuiteAlgorithm)]


class MemoryAroundSurgery(Callback):
    """Per batch: its peak memory; kept for the batches where the model changed and the one before."""

    def __init__(self):
        self.surgeries: list[dict[str, Any]] = []
        self.params_start: int | None = None
        self.peak = {"peak_alloc_gib": None, "peak_reserved_gib": None}
        self._last: tuple | None = None
        self._previous: dict[str, float] = {}

    def _shape(self, state) -> tuple:
        params = sum(p.numel() for p in state.model.parameters())
        return params, sum(len(a.run_events()) for a in _suite(state))

    def fit_start(self, state, logger) -> None:
        self.params_start = self._shape(state)[0]

    def batch_end(self, state, logger) -> None:
        memory, shape = _memory(), self._shape(state)
        for key, value in memory.items():
            self.peak[key] = max(self.peak[key] or 0.0, value)
        if self._last is not None and shape != self._last:
            self.surgeries.append({"batch": int(state.timestamp.batch), "params": shape[0], "before": self._previous,
                                   "during": memory})
        self._last, self._previous = shape, memory


def facts(trainer, plan, monitor: MemoryAroundSurgery) -> dict[str, Any]:
    """What the run did, as checked and reported."""
    from composer_growth.unwrap import unwrap_hf

    state = trainer.state
    loss = state.loss
    param = next(state.model.parameters())
    return {
        "batches": int(state.timestamp.batch), "max_batches": int(state.max_duration.value),
        "loss": float(loss.item()) if torch.is_tensor(loss) else None,
        "device": param.device.type, "precision": str(state.precision.value),
        "attention": getattr(unwrap_hf(state.model).config, "_attn_implementation", None),
        "fsdp": bool(state.fsdp_enabled), "world_size": dist.get_world_size(),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "params_start": monitor.params_start, "params_end": sum(p.numel() for p in state.model.parameters()),
        "events": [{"batch": int(e["batch"]), "name": e.get("name", type(a).__name__)}
                   for a in _suite(state) for e in a.run_events()],
        "silent": [type(a).__name__ for a in _suite(state) if not a.run_events()],
        **monitor.peak, "surgeries": monitor.surgeries,
    }


def problems(f: dict[str, Any], recipe) -> list[str]:
    """Each way the run fell short of what its recipe asked for."""
    out = []
    if f["batches"] != f["max_batches"]:
        out.append(f"trained {f['batches']} of {f['max_batches']} batches")
    if f["loss"] is None or not math.isfinite(f["loss"]):
        out.append(f"loss {f['loss']}")
    want_device = {"gpu": "cuda", "cpu": "cpu"}.get(recipe.device or "", f["device"])
    if f["device"] != want_device:
        out.append(f"model on {f['device']}, not {want_device}")
    if f["precision"] != recipe.precision:
        out.append(f"precision {f['precision']}, not {recipe.precision}")
    if f["attention"] != recipe.model.attn_implementation:
        out.append(f"attention {f['attention']}, not {recipe.model.attn_implementation}")
    if recipe.parallelism and "fsdp" in recipe.parallelism:
        if not f["fsdp"]:
            out.append("FSDP asked for, not enabled")
        want_backend = "nccl" if f["device"] == "cuda" else "gloo"
        if f["backend"] != want_backend:
            out.append(f"process group backend {f['backend']}, not {want_backend}")
    out.extend(f"{name} reported no event" for name in f["silent"])
    return out


def smoke_one(path: str, overrides: list[str]) -> dict[str, Any]:
    """Train one recipe; its entry for the results (never raises)."""
    from composer_growth.recipe import load_recipe, run, validate

    name = os.path.splitext(os.path.basename(path))[0].removeprefix("gpu-")
    entry: dict[str, Any] = {"step": f"smoke {name}", "recipe": path, "result": "fail", "problems": []}
    start = time.perf_counter()
    try:
        if torch.cuda.is_available():  # the peaks are this recipe's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        plan = validate(load_recipe(path, overrides))
        monitor = MemoryAroundSurgery()
        plan.callbacks.append(monitor)
        trainer = run(plan)
        entry.update(facts(trainer, plan, monitor))
        entry["problems"] = problems(entry, plan.recipe)
        entry["result"] = "fail" if entry["problems"] else "pass"
        del trainer
    except Exception as e:  # noqa: BLE001 - recorded, and the next recipe runs
        traceback.print_exc()
        entry["problems"] = [f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"]
    entry["seconds"] = round(time.perf_counter() - start, 1)
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every recipe")
    args = p.parse_args(argv)
    entries = []
    for path in args.recipes:
        entries.append(smoke_one(path, args.set))
        e = entries[-1]
        print(f"== {e['step']}: {e['result']} in {e['seconds']} s {'; '.join(e['problems'])}", flush=True)
        if dist.get_global_rank() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(entries, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
    return 0 if all(e["result"] == "pass" for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
