"""Growth surgery under FSDP2 against DDP: seconds and peak memory per rank, under ``composer -n N``.

Each rank trains the same recipe several times in one process (``--runs``, in that order): ``ddp``,
then under FSDP2 (``parallelism.fsdp.version: 2``, one unit per block) ``gathered`` (the growth on the
full model and optimizer state gathered on every rank, ``COMPOSER_GROWTH_FSDP_PATH=gathered``) and
``shard-local`` (each rank grows its own shards), on real MDS shards: a llama grown after ``--grow-at``
batches by ``--op stack`` (``StackLayers(mode="repeat", times=2, init="function_preserving")``) or
``--op widen`` (``WidenMLP(factor=2)``), then trained on. Per run and rank it reports the surgery's
seconds and path, the resident set size before, at its peak during, and after the surgery (CPU; sampled
every ms by a thread) or CUDA ``memory_allocated`` / ``max_memory_allocated``; the bound a sharded growth
should stay under, (grown parameters + optimizer state) / world size + one block, in bytes; and the
largest difference between the run's per-batch training losses and the first (and second) run's.

    composer -n 2 benchmarks/growth_fsdp.py --device cpu --tiny        # a llama of about 10M parameters
    MALLOC_MMAP_THRESHOLD_=131072 composer -n 4 benchmarks/growth_fsdp.py --device cpu --deep --runs gathered,shard-local
    composer -n 8 benchmarks/growth_fsdp.py --device gpu               # about 0.4B parameters
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from composer.core import Callback  # noqa: E402
from composer.utils import dist  # noqa: E402

from common import PeakRSS, describe_device, ensure_data, markdown_table, rss_bytes, write_json  # noqa: E402

FULL = dict(hidden=1024, layers=12, intermediate=2816, heads=16, seq_len=512, batch_per_rank=4, steps=6, grow_at=3,
            vocab_size=8192, max_bytes=20_000_000, precision="amp_bf16")
TINY = dict(hidden=384, layers=4, intermediate=1024, heads=6, seq_len=64, batch_per_rank=2, steps=4, grow_at=2,
            vocab_size=4096, max_bytes=3_000_000, precision="fp32")
DEEP = dict(TINY, hidden=256, layers=24, intermediate=688, heads=4)  # one block: 3.8% of the model
RUNS = ("ddp", "gathered", "shard-local")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--tiny", action="store_true", help="a small llama: a quick look on a CPU")
    p.add_argument("--deep", action="store_true", help="a deep, narrow llama (24 x 256): one block is a small part")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, in order, of {', '.join(RUNS)}")
    p.add_argument("--op", choices=("stack", "widen"), default="stack")
    p.add_argument("--data", help="a prepared dataset (built here from Python source if missing)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--out", default="runs/bench/growth_fsdp.json")
    args = p.parse_args(argv)
    args.runs = args.runs.split(",")
    if not args.runs or any(r not in RUNS for r in args.runs):
        p.error(f"--runs: a comma-separated list of {', '.join(RUNS)}, not {','.join(args.runs)}")
    for k, v in (DEEP if args.deep else TINY if args.tiny else FULL).items():
        setattr(args, k, v)
    args.data = args.data or f"./data/bench-{args.seq_len}-{args.vocab_size}"
    return args


class Losses(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def batch_end(self, state, logger):
        self.losses.append(float(state.loss.detach()))


def _memory() -> int | None:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else rss_bytes()


def _measured(fire, record: dict[str, Any]):
    """The algorithm's growth, with memory read before, at its peak during and after it."""

    def wrapped(state, logger):
        record["before"] = _memory()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            fire(state, logger)
            record["peak"] = torch.cuda.max_memory_allocated()
        else:
            with PeakRSS() as peak:
                fire(state, logger)
            record["peak"] = peak.peak
        record["after"] = _memory()

    return wrapped


def recipe(args, kind: str) -> dict[str, Any]:
    world = dist.get_world_size()
    r = {
        "run_name": f"growth-{kind}", "seed": 17, "data": {"path": args.data},
        "model": {"family": "llama", "config": {
            "hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
            "max_position_embeddings": args.seq_len}},
        "optimizer": {"name": "decoupled_adamw", "lr": 1e-3},
        "scheduler": {"name": "constant_with_warmup", "t_warmup": "1ba"},
        "algorithms": ({"stack_layers": {"at": f"{args.grow_at}ba", "mode": "repeat", "times": 2,
                                         "init": "function_preserving", "probe_loss": False}} if args.op == "stack"
                       else {"widen_mlp": {"at": f"{args.grow_at}ba", "factor": 2, "probe_loss": False}}),
        "global_train_batch_size": args.batch_per_rank * world, "device_train_microbatch_size": args.batch_per_rank,
        "max_duration": f"{args.steps}ba", "eval_first": False, "eval_interval": f"{args.steps}ba",
        "eval_subset_num_batches": 1, "precision": args.precision, "device": args.device, "progress_bar": False,
        "console_log_interval": f"{args.steps}ba",
    }
    if kind != "ddp":
        r["parallelism"] = {"fsdp": {"version": 2}}
    return r


def _sizes(trainer) -> dict[str, int]:
    """Bytes of the (grown) model's parameters, of its optimizer state and of its largest block (global sizes)."""
    from composer_growth.families import family_of, get_path
    from composer_growth.unwrap import composer_model, unwrap_hf

    hf = unwrap_hf(composer_model(trainer.state))
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    state = [v for opt in trainer.state.optimizers for st in opt.state.values() for v in st.values()
             if torch.is_tensor(v) and v.dim() > 0]
    return {"param_bytes": size(hf.parameters()), "state_bytes": size(state),
            "block_bytes": max(size(b.parameters()) for b in get_path(hf, family_of(hf).layers))}


def run(args, kind: str) -> dict[str, Any]:
    from composer_growth.algorithms.shard_local import PATH_ENV
    from composer_growth.recipe import build_trainer, validate

    os.environ[PATH_ENV] = "gathered" if kind == "gathered" else "shard-local"
    plan = validate(recipe(args, kind))
    losses = Losses()
    plan.callbacks.append(losses)
    trainer = build_trainer(plan)
    alg = trainer.state.algorithms[0]
    memory: dict[str, Any] = {}
    alg._fire = _measured(alg._fire, memory)
    trainer.fit()
    out = {"run": kind, "rank": dist.get_global_rank(), "seconds": alg.record["seconds"], "path": alg.record["path"],
           "params_before": alg.record["params_before"], "params_after": alg.record["params_after"],
           "losses": losses.losses, **memory, **_sizes(trainer)}
    trainer.close()
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if dist.get_local_rank() == 0:
        ensure_data(args.data, seq_len=args.seq_len, vocab_size=args.vocab_size, max_bytes=args.max_bytes)
    from composer_growth.recipe.build import init_dist, validate

    init_dist(validate(recipe(args, "ddp")))
    dist.barrier()
    rows = [run(args, kind) for kind in args.runs]
    gathered = [row for rank_rows in dist.all_gather_object(rows) for row in rank_rows]
    if dist.get_global_rank() != 0:
        return
    world = dist.get_world_size()
    mb = lambda x: f"{x / 2**20:,.0f}" if x is not None else "n/a"  # noqa: E731
    table = []
    diff = lambda row, run: max(abs(a - b) for a, b in zip(row["losses"], next(  # noqa: E731
        r for r in gathered if r["run"] == run and r["rank"] == row["rank"])["losses"]))
    for row in gathered:
        extra = row["peak"] - row["before"] if row["peak"] and row["before"] else None
        row["bound"] = (row["param_bytes"] + row["state_bytes"]) / world + row["block_bytes"]
        table.append({"run": row["run"], "path": row["path"], "rank": row["rank"], "seconds": f"{row['seconds']:.3f}",
                      "params": f"{row['params_before'] / 1e6:.1f}M -> {row['params_after'] / 1e6:.1f}M",
                      "before": mb(row["before"]), "peak": mb(row["peak"]), "after": mb(row["after"]),
                      "peak_extra": mb(extra), "bound": mb(row["bound"]),
                      "ratio": f"{extra / row['bound']:.2f}" if extra is not None else "n/a",
                      **{f"diff_{run}": f"{diff(row, run):.1e}" for run in args.runs[:2]}})
    unit = "MiB (CUDA allocated)" if args.device == "gpu" else "MiB (RSS)"
    print(markdown_table(table, [("run", "run"), ("path", "path"), ("rank", "rank"), ("seconds", "surgery s"),
                                 ("params", "params"), ("before", f"before, {unit}"), ("peak", "peak during"),
                                 ("after", "after"), ("peak_extra", "peak - before"),
                                 ("bound", "(grown model + opt state) / world + block"), ("ratio", "extra / bound"),
                                 *[(f"diff_{run}", f"max loss diff vs {run}") for run in args.runs[:2]]]))
    write_json(args.out, {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "device": describe_device(args.device), "world_size": world,
                          "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                          "settings": {k: v for k, v in vars(args).items()}, "rows": gathered})


if __name__ == "__main__":
    main()
