"""LoRA during pre-training: full rank, plain LoRA, ReLoRA and ReLoRA after a full-rank warm start, side by side.

Real Composer Trainers, one after another in one process, from the same initial weights, on the
same data in the same order, for the same number of batches (equal tokens), DecoupledAdamW and a
cosine schedule (5% warmup):

* ``full``: every parameter trains;
* ``lora``: LoRA adapters (rank ``--rank``, alpha = rank) on every linear layer of the blocks from
  the start; the embeddings, norms and output head train fully (as in ReLoRA);
* ``relora``: the same, plus ``LoraMergeRestart``: merge and restart every ``--interval`` batches,
  adapters' Adam moments magnitude-pruned (``--ratio``), LR ramp of ``--restart-warmup`` batches;
* ``relora-warm``: full rank until ``--warm-start`` of the run, then as ``relora``.

Reported: eval loss over tokens, final eval loss, trainable parameters and optimizer-state bytes at
the end, mean step time (with adapters: after they are on; step 0 and merge batches left out).

    python benchmarks/lora.py --device cpu --tiny        # about 5 minutes on 2 CPU cores
    python benchmarks/lora.py --device gpu               # 768 wide, 12 layers, 1000 x 32 x 1024
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (Recorder, add_shape_args, base_parser, bench_trainer, build_recipe_parts,  # noqa: E402
                    describe_device, fill_defaults, finish_args, markdown_table, mean_ms, peak_memory,
                    reset_peak_memory, set_up_with_eval, write_json)

RUNS = ("full", "lora", "relora", "relora-warm")

FULL = dict(steps=1000, batch_size=32, seq_len=1024, hidden=768, intermediate=2048, heads=12, layers=12,
            eval_interval=50, eval_batches=20, precision="amp_bf16", lr=6e-4, vocab_size=8192,
            max_bytes=150_000_000, rank=128, interval=200, restart_warmup=20)
TINY = dict(steps=100, batch_size=16, seq_len=128, hidden=128, intermediate=352, heads=4, layers=4,
            eval_interval=10, eval_batches=4, precision="fp32", lr=3e-3, vocab_size=2048,
            max_bytes=8_000_000, rank=16, interval=25, restart_warmup=5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0], RUNS, "runs/bench/lora.json",
                    "a prepared dataset (default: ./data/bench-<seq_len>, built if missing)")
    add_shape_args(p)
    p.add_argument("--rank", type=int, help="LoRA rank (alpha = rank)")
    p.add_argument("--interval", type=int, help="batches between ReLoRA merges")
    p.add_argument("--restart-warmup", type=int, help="batches of LR ramp after each merge")
    p.add_argument("--ratio", type=float, default=0.9, help="share of the adapters' Adam moments pruned (magnitude)")
    p.add_argument("--warm-start", type=float, default=0.25, help="relora-warm: share of the run at full rank")
    args = p.parse_args(argv)
    fill_defaults(args, TINY if args.tiny else FULL)
    finish_args(p, args, RUNS, args.seq_len)
    if args.include:
        p.error("--include: not supported here (the four runs take minutes on a CPU)")
    if args.interval >= args.steps:
        p.error("--interval: shorter than --steps (a merge must happen)")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("steps", "batch_size", "seq_len", "hidden", "intermediate", "heads", "layers", "eval_interval",
            "eval_batches", "precision", "lr", "seed", "rank", "interval", "restart_warmup", "ratio", "warm_start",
            "device")
    return {k: getattr(args, k) for k in keys}


def build_trainer(name: str, args: argparse.Namespace, tokenizer, eval_loader, recorder, steps: int):
    from composer.utils import reproducibility

    from composer_growth import LoraMergeRestart
    from composer_growth.unwrap import unwrap_hf
    from composer_growth.functional import add_lora
    from composer_growth.recipe.build import build_model

    config = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    recipe = build_recipe_parts("llama", config, args.lr, t_warmup=f"{max(1, round(0.05 * steps))}ba")
    reproducibility.seed_all(args.seed)
    model = build_model(recipe, tokenizer)
    algorithms = []
    if name in ("lora", "relora"):
        add_lora(unwrap_hf(model), "all", rank=args.rank)
    relora = dict(interval=f"{args.interval}ba", restart_warmup=f"{args.restart_warmup}ba", prune="magnitude",
                  ratio=args.ratio, seed=args.seed)
    if name == "relora":
        algorithms.append(LoraMergeRestart(**relora))
    if name == "relora-warm":
        algorithms.append(LoraMergeRestart(start_at=f"{round(args.warm_start * steps)}ba", targets="all",
                                           rank=args.rank, **relora))
    return bench_trainer(args, model, recipe, eval_loader, recorder, steps, algorithms)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if torch.is_tensor(t))


def run_one(name: str, args: argparse.Namespace, tokenizer, eval_loader, steps: int) -> dict[str, Any]:
    gc.collect()
    reset_peak_memory(args.device)
    recorder = Recorder()
    trainer = build_trainer(name, args, tokenizer, eval_loader, recorder, steps)
    trainer.fit()
    model, opt = trainer.state.model, trainer.state.optimizers[0]
    alg = trainer.state.algorithms[0] if trainer.state.algorithms else None
    result = {
        "evals": recorder.evals, "step_times": recorder.step_times, "tokens": recorder.tokens,
        "first_ids": recorder.first_ids, "train_time_s": sum(recorder.step_times),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "merges": [h["batch"] for h in alg.history] if alg is not None else [],
        "merge_seconds": [h["seconds"] for h in alg.history] if alg is not None else [],
        "peak_memory": peak_memory(args.device),
    }
    trainer.close()
    del trainer
    gc.collect()
    return result


def summarize(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, str]]:
    base = results.get("full")
    rows = []
    for name in [r for r in RUNS if r in results]:
        res = results[name]
        first = round(args.warm_start * args.steps) + 1 if name == "relora-warm" else 1
        skip = {b - 1 for b in res["merges"]} | {first - 1}  # merge batches (0-indexed), adapters' first batch
        times = [t for i, t in enumerate(res["step_times"]) if i >= first and i not in skip]
        res["mean_step_ms"] = mean_ms(times)
        loss = res["evals"][-1]["loss"]
        mem = res["peak_memory"]
        rows.append({
            "run": name, "loss": f"{loss:.4f}",
            "vs": f"{loss - base['evals'][-1]['loss']:+.4f}" if base else "n/a",
            "trainable": f"{res['trainable']:,} ({100 * res['trainable'] / res['params']:.0f}%)",
            "opt": f"{res['optimizer_state_bytes'] / 2**20:.2f}",
            "step": f"{res['mean_step_ms']:.1f}" if res["mean_step_ms"] else "n/a",
            "merges": ", ".join(str(b) for b in res["merges"]) or "-",
            "merge_ms": f"{1000 * max(res['merge_seconds']):.1f}" if res["merge_seconds"] else "-",
            "tokens": f"{res['tokens']:,}",
            "mem": "n/a" if mem is None else f"{mem / 2**20:,.0f}",
        })
    return rows


COLUMNS = [("run", "run"), ("loss", "final eval loss"), ("vs", "vs full"), ("trainable", "trainable params"),
           ("opt", "optimizer state MiB"), ("step", "mean step ms (adapters on)"), ("merges", "merges at batch"),
           ("merge_ms", "slowest merge ms"), ("tokens", "tokens trained"), ("mem", "peak mem MiB")]


def loss_over_tokens(results: dict[str, dict[str, Any]]) -> str:
    names = [r for r in RUNS if r in results]
    by_batch: dict[int, dict[str, str]] = {}
    for name in names:
        for e in results[name]["evals"]:
            row = by_batch.setdefault(e["batch"], {"batch": str(e["batch"]), "tokens": f"{e['tokens']:,}"})
            row[name] = f"{e['loss']:.4f}"
    return markdown_table([by_batch[b] for b in sorted(by_batch)],
                          [("batch", "batch"), ("tokens", "tokens"), *[(n, n) for n in names]])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tokenizer, eval_loader = set_up_with_eval(args)
    header = (f"lora on {describe_device(args.device)}: llama {args.hidden} wide, {args.layers} layers (MLP "
              f"{args.intermediate}, {args.heads} heads, untied embeddings), {args.steps} batches of {args.batch_size} x "
              f"{args.seq_len}, {args.precision}, lr {args.lr} (cosine, 5% warmup); LoRA rank {args.rank} (alpha = "
              f"rank) on every linear layer of the blocks; ReLoRA merges every {args.interval} batches, magnitude "
              f"pruning {args.ratio}, LR ramp {args.restart_warmup} batches; warm start {args.warm_start:.0%} full "
              f"rank; eval every {args.eval_interval} batches on {len(eval_loader.dataset)} x {args.seq_len} tokens")
    print(header, flush=True)
    run_one("full", args, tokenizer, eval_loader, steps=3)  # unrecorded: one-off set-up falls on no run
    results: dict[str, Any] = {}
    for name in args.runs:
        start = time.perf_counter()
        results[name] = r = run_one(name, args, tokenizer, eval_loader, args.steps)
        print(f"  {name:12s} final eval loss {r['evals'][-1]['loss']:.4f}, train {r['train_time_s']:.1f} s "
              f"(wall {time.perf_counter() - start:.1f} s), trainable {r['trainable']:,}, merges {r['merges']}, "
              f"first ids {r['first_ids']}", flush=True)
    if len({tuple(r["first_ids"]) for r in results.values()}) > 1:
        print("WARNING: the runs did not see the same first batch", flush=True)
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": describe_device(args.device),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "header": header,
           "settings": settings(args), "runs": results, "table": markdown_table(summarize(results, args), COLUMNS),
           "loss_table": loss_over_tokens(results)}
    write_json(args.out, out)
    print(f"\nresults: {args.out}\n\n{out['loss_table']}\n\n{out['table']}", flush=True)
    return out


if __name__ == "__main__":
    main()
