"""Train a recipe (alone or under the Composer launcher) and record CUDA memory around each surgery.

    python3 benchmarks/gpu_smoke.py RECIPE OUT_DIR [key=value ...]
    python3 -m composer.cli.launcher -n 2 benchmarks/gpu_smoke.py RECIPE OUT_DIR parallelism.fsdp.version=2

Writes ``OUT_DIR/<run_name>-rank<r>.json``: batches, seconds, the final train loss, the run's peak
memory allocated / reserved, and for each batch where the model changed (parameter count, a LoRA
merge, an orchestrator op) the peak allocated / reserved during that batch and the batch before.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from composer.core import Callback
from composer.utils import dist

from composer_growth.recipe import load_recipe, run, validate

GiB = 2**30


def _memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    out = {"peak_alloc_gib": torch.cuda.max_memory_allocated() / GiB,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
    torch.cuda.reset_peak_memory_stats()
    return out


class MemoryAroundSurgery(Callback):
    """Per batch: the peak memory of the batch; kept for the batches where the model changed and the one before."""

    def __init__(self):
        self.surgeries: list[dict] = []
        self._last: tuple | None = None
        self._previous: dict = {}
        self.peak = {"peak_alloc_gib": 0.0, "peak_reserved_gib": 0.0}

    def _shape(self, state) -> tuple:
        params = sum(p.numel() for p in state.model.parameters())
        merges = sum(int(getattr(a, "merges", 0) or 0) for a in state.algorithms)
        ops = sum(len(getattr(a, "fired", []) or []) for a in state.algorithms)
        return params, merges, ops

    def batch_end(self, state, logger):
        memory, shape = _memory(), self._shape(state)
        for key, value in memory.items():
            self.peak[key] = max(self.peak[key], value)
        if self._last is not None and shape != self._last:
            self.surgeries.append({"batch": int(state.timestamp.batch), "params": shape[0], "merges": shape[1],
                                   "ops": shape[2], "before": self._previous, "during": memory})
        self._last, self._previous = shape, memory


def main() -> None:
    recipe_path, out_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    plan = validate(load_recipe(recipe_path, overrides))
    monitor = MemoryAroundSurgery()
    plan.callbacks.append(monitor)
    start = time.perf_counter()
    trainer = run(plan)
    seconds = time.perf_counter() - start
    loss = trainer.state.loss
    result = {"run": plan.recipe.run_name, "rank": dist.get_global_rank(), "world_size": dist.get_world_size(),
              "fsdp": bool(trainer.state.fsdp_enabled), "batches": int(trainer.state.timestamp.batch),
              "seconds": round(seconds, 1), "loss": float(loss.item()) if torch.is_tensor(loss) else None,
              **monitor.peak,
              "surgeries": monitor.surgeries}
    os.makedirs(out_dir, exist_ok=True)
    tag = "fsdp" if result["fsdp"] else ("ddp" if result["world_size"] > 1 else "single")
    with open(os.path.join(out_dir, f"{plan.recipe.run_name}-{tag}-rank{result['rank']}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
