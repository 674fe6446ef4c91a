"""Orchestrator: the same growth ops fired by eval-loss thresholds, at fixed times, and no growth, side by side.

Real Composer Trainers, one after another in one process, from the same data in the same order,
with DecoupledAdamW and a cosine schedule (5% warmup); the growth runs may train longer
(``--growth-steps``, default ``--steps``) so that they can reach the static run's final loss:

* ``static`` (no growth): the final architecture (``--layers`` deep, MLP ``--intermediate``) from scratch.
* ``loss``: half as deep with an MLP 1.5x narrower; ``Orchestrator`` grows it by ``stack_layers(2)``
  (``init=copy``, G_stack) when the eval loss drops below the first ``--triggers`` threshold, then by
  ``widen_mlp(1.5)`` below the second (both re-evaluated; each also fires after ``--max-wait`` of the
  run since the last op).
* ``fixed``: the same start and ops, fired at fixed shares of the run (``--fixed-at``) instead.

Compared: tokens and training time (evals left out) at which each run's eval loss first reaches
the static run's final eval loss, and the final eval loss.

    python benchmarks/orchestrator.py --device cpu --tiny --growth-steps 150   # a few minutes on a CPU
    python benchmarks/orchestrator.py --device gpu --growth-steps 1250   # 768 wide, 12 layers vs 6 -> 12
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

from common import (Recorder, add_shape_args, base_parser, bench_trainer, build_recipe_parts,  # noqa: E402
                    describe_device, fill_defaults, finish_args, load_included, loss_table, markdown_table,
                    set_up_with_eval, time_to_loss, write_json)

RUNS = ("static", "loss", "fixed")

FULL = dict(steps=1000, batch_size=32, seq_len=1024, hidden=768, intermediate=2304, heads=12, layers=12,
            eval_interval=25, eval_batches=20, precision="amp_bf16", lr=6e-4, vocab_size=8192,
            max_bytes=150_000_000, triggers="5.0,4.2")
TINY = dict(steps=120, batch_size=16, seq_len=128, hidden=64, intermediate=192, heads=4, layers=4,
            eval_interval=10, eval_batches=8, precision="fp32", lr=3e-3, vocab_size=2048,
            max_bytes=8_000_000, triggers="6.6,6.3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0], RUNS, "runs/bench/orchestrator.json",
                    "a prepared dataset (default ./data/bench-<seq_len>, built if missing)")
    add_shape_args(p, intermediate="MLP width of the final model (the start has 1 / 1.5 of it)",
                   layers="depth of the final model (the start has half)")
    p.add_argument("--triggers", help="eval-loss thresholds of stack_layers and widen_mlp (run 'loss')")
    p.add_argument("--max-wait", type=float, default=0.4, help="timeout of each op of run 'loss', share of the run")
    p.add_argument("--fixed-at", default="0.25,0.5", help="shares of --steps after which run 'fixed' grows")
    p.add_argument("--growth-steps", type=int, help="training batches of runs 'loss' and 'fixed' (default: --steps)")
    args = p.parse_args(argv)
    fill_defaults(args, TINY if args.tiny else FULL)
    args.triggers = [float(x) for x in str(args.triggers).split(",")]
    args.fixed_at = [float(x) for x in str(args.fixed_at).split(",")]
    if len(args.triggers) != 2 or len(args.fixed_at) != 2:
        p.error("--triggers and --fixed-at: two values each (stack_layers, widen_mlp)")
    if args.layers % 2 or (args.intermediate * 2) % 3:
        p.error("--layers even and --intermediate divisible by 1.5 (the start model has half / 1 / 1.5 of them)")
    if not 0 < args.fixed_at[0] < args.fixed_at[1] < 1:
        p.error("--fixed-at: 0 < first < second < 1")
    finish_args(p, args, RUNS, args.seq_len)
    args.growth_steps = args.growth_steps or args.steps
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("steps", "growth_steps", "batch_size", "microbatch", "seq_len", "hidden", "intermediate", "heads", "layers",
            "eval_interval", "eval_batches", "precision", "lr", "seed", "data", "device", "triggers", "max_wait",
            "fixed_at")
    return {k: getattr(args, k) for k in keys}


def schedule(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ops of a run: the same two, fired by loss (with a timeout) or at fixed batches."""
    stack = {"name": "stack_layers", "value": 2, "args": {"init": "copy"}}
    widen = {"name": "widen_mlp", "value": 1.5, "args": {"noise_std": 0.001}}
    if name == "loss":
        wait = max(1, round(args.max_wait * args.steps))
        return [{**stack, "trigger_loss": args.triggers[0], "max_wait_iters": wait, "reevaluate": True},
                {**widen, "trigger_loss": args.triggers[1], "max_wait_iters": wait, "reevaluate": True}]
    first = max(1, round(args.fixed_at[0] * args.steps))
    second = max(first + 1, round(args.fixed_at[1] * args.steps))
    return [{**stack, "trigger_loss": None, "max_wait_iters": first},
            {**widen, "trigger_loss": None, "max_wait_iters": second - first}]


def build_trainer(name: str, args: argparse.Namespace, tokenizer, eval_loader, recorder, steps: int):
    from composer.utils import reproducibility

    from composer_growth import Orchestrator
    from composer_growth.recipe.build import build_model

    grows = name != "static"
    config = dict(hidden_size=args.hidden, intermediate_size=args.intermediate * 2 // 3 if grows else args.intermediate,
                  num_hidden_layers=args.layers // 2 if grows else args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.heads, max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    recipe = build_recipe_parts("llama", config, args.lr, t_warmup=f"{max(1, round(0.05 * args.steps))}ba")
    reproducibility.seed_all(args.seed)
    model = build_model(recipe, tokenizer)
    algorithms = [Orchestrator(schedule=schedule(name, args), verbose=False)] if grows else []
    return bench_trainer(args, model, recipe, eval_loader, recorder, steps, algorithms)


def run_one(name: str, args: argparse.Namespace, tokenizer, eval_loader, steps: int) -> dict[str, Any]:
    gc.collect()
    recorder = Recorder()
    trainer = build_trainer(name, args, tokenizer, eval_loader, recorder, steps)
    params_start = sum(p.numel() for p in trainer.state.model.parameters())
    trainer.fit()
    fired = [dict(r) for r in trainer.state.algorithms[0].fired] if trainer.state.algorithms else []
    result = {"evals": recorder.evals, "step_times": recorder.step_times, "train_time_s": sum(recorder.step_times),
              "tokens": recorder.tokens, "first_ids": recorder.first_ids, "params_start": params_start,
              "params_end": sum(p.numel() for p in trainer.state.model.parameters()), "fired": fired}
    trainer.close()
    del trainer
    gc.collect()
    return result


def _fmt(x: Any, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def summarize(results: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    base = results.get("static")
    target = base["evals"][-1]["loss"] if base else None
    base_time = time_to_loss(base["evals"], target) if base else None
    base_tokens = time_to_loss(base["evals"], target, "tokens") if base else None
    rows = []
    for name in [r for r in RUNS if r in results]:
        res = results[name]
        t = time_to_loss(res["evals"], target) if base else None
        tok = time_to_loss(res["evals"], target, "tokens") if base else None
        res.update(time_to_target_s=t, tokens_to_target=tok, target=target,
                   speedup=base_time / t if base_time and t else None,
                   token_ratio=base_tokens / tok if base_tokens and tok else None)
        ops = ", ".join(f"{r['name']} @ {r['batch']} ({r['reason']})" for r in res["fired"]) or "-"
        rows.append({
            "run": name, "params": f"{res['params_start']:,} -> {res['params_end']:,}", "ops": ops,
            "loss": f"{res['evals'][-1]['loss']:.4f}", "total": f"{res['train_time_s']:.1f}",
            "ttt": _fmt(t, ".1f", "not reached"),
            "speedup": _fmt(res["speedup"], ".2f") + ("x" if res["speedup"] else ""),
            "tok": _fmt(tok, ",.0f", "not reached"),
            "tokratio": _fmt(res["token_ratio"], ".2f") + ("x" if res["token_ratio"] else ""),
        })
    return rows


COLUMNS = [("run", "run"), ("params", "params start -> end"), ("ops", "ops fired (batch, why)"),
           ("loss", "final eval loss"), ("total", "train time (s)"), ("ttt", "time to static's final loss (s)"),
           ("speedup", "speedup (time)"), ("tok", "tokens to it"), ("tokratio", "fewer tokens (x)")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tokenizer, eval_loader = set_up_with_eval(args)
    header = (f"orchestrator on {describe_device(args.device)}: llama {args.hidden} wide, {args.heads} heads, tied "
              f"embeddings; static {args.layers} layers, MLP {args.intermediate}; loss / fixed start at "
              f"{args.layers // 2} layers, MLP {args.intermediate * 2 // 3}; {args.steps} batches (growth runs "
              f"{args.growth_steps}) of {args.batch_size} "
              f"x {args.seq_len}, {args.precision}, lr {args.lr}; triggers {args.triggers} (timeouts "
              f"{args.max_wait:g} of the run), fixed at {args.fixed_at}; eval every {args.eval_interval} batches on "
              f"{len(eval_loader.dataset)} x {args.seq_len} validation tokens")
    print(header, flush=True)
    results: dict[str, Any] = {}
    if args.include:
        results.update(load_included(args.include, settings(args)))
    run_one("static", args, tokenizer, eval_loader, steps=3)  # unrecorded: one-off set-up falls on no run
    for name in args.runs:
        start = time.perf_counter()
        results[name] = r = run_one(name, args, tokenizer, eval_loader,
                                    args.steps if name == "static" else args.growth_steps)
        print(f"  {name:7s} final eval loss {r['evals'][-1]['loss']:.4f}, train {r['train_time_s']:.1f} s "
              f"(wall {time.perf_counter() - start:.1f} s), "
              f"ops {[(f['name'], f['batch'], f['reason']) for f in r['fired']]}",
              flush=True)
    if len({tuple(r["first_ids"]) for r in results.values()}) > 1:
        print("WARNING: the runs did not see the same first batch", flush=True)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": describe_device(args.device), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "header": header, "settings": settings(args), "runs": results}
    out["table"] = markdown_table(summarize(results), COLUMNS)
    out["loss_table"] = loss_table(results, [r for r in RUNS if r in results])
    write_json(args.out, out)
    print(f"\nresults: {args.out}\n\n{header}\n\n{out['loss_table']}\n\n{out['table']}", flush=True)
    return out


if __name__ == "__main__":
    main()
