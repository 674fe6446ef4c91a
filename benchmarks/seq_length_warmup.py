r"""Sequence-length warmup, side by side: no warmup, Composer's ``SeqLengthWarmup``, ours (truncate, reshape).

One process trains every variant from the same initial weights, on the same data in the same
order, with the same optimizer (DecoupledAdamW) and schedule (cosine with warmup), each with a real
Composer ``Trainer``, evaluating every ``--eval-interval`` batches on a fixed validation subset at
full length. For each it prints the training time (evals left out) to reach the baseline's final eval
loss and its speedup over the baseline, the mean step time and throughput in the warmup phase and
after it, peak memory, and the tokens trained (really, and as Composer's ``time/token`` counts them).

    python benchmarks/seq_length_warmup.py --device cpu --tiny          # 1-2 minutes on a CPU, once the data is built
    python benchmarks/seq_length_warmup.py --device gpu                 # GPT-2-124M shape, 1000 x 32 x 1024
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/seq_length_warmup.py --device cpu --small --steps 10 \
        --warmup-duration 0.6 --eval-interval 10 --eval-batches 1 --repeats 2 \
        --runs baseline,composer-reshape,ours-reshape-rows,ours-reshape-tokens,ours-reshape-bounded  # microbatch policies

The full mode's model is GPT-2-124M-shaped (12 layers, 768 wide, 12 heads, 1024 positions, no dropout)
with an 8192-token BPE (so about 92M parameters); the tiny mode's is a 2-layer, 64-wide llama.
Runs can be split over several invocations: ``--include earlier.json`` adds the runs of an earlier
``--out`` file (same settings) to this one's table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (PeakRSS, Recorder, add_shape_args, base_parser, bench_trainer, build_recipe_parts,  # noqa: E402
                    describe_device, fill_defaults, finish_args, fixed_eval_loader, initial_state, load_included,
                    markdown_table, peak_memory, reset_peak_memory, set_up, time_to_loss, write_json)

RUNS = ("baseline", "composer", "ours-truncate", "composer-reshape", "ours-reshape-rows", "ours-reshape-tokens",
        "ours-reshape-bounded")

FULL = dict(family="gpt2", steps=1000, batch_size=32, seq_len=1024, min_seq_len=64, step_size=64,
            eval_interval=50, eval_batches=20, precision="amp_bf16", lr=6e-4, vocab_size=8192,
            max_bytes=150_000_000)
# the issue's CPU setting: a llama of 4 layers x 256 on 8 x 512 tokens, reshape 128 -> 512
SMALL = dict(family="llama", steps=20, batch_size=8, seq_len=512, min_seq_len=128, step_size=128,
             eval_interval=10, eval_batches=2, precision="fp32", lr=1e-3, vocab_size=2048,
             max_bytes=8_000_000)
TINY = dict(family="llama", steps=60, batch_size=16, seq_len=128, min_seq_len=32, step_size=16,
            eval_interval=10, eval_batches=8, precision="fp32", lr=3e-3, vocab_size=2048,
            max_bytes=8_000_000)
# With these, Composer's schedule (min + step * (batch // (warmup batches // updates))) and ours (linear,
# rounded down to step_size) give the same length at every batch: 300 // 15 = 20 and 18 // 6 = 3.


def model_config(family: str, seq_len: int, small: bool = False) -> dict[str, Any]:
    if family == "gpt2":
        return dict(n_embd=768, n_layer=12, n_head=12, n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0)
    if small:
        return dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=seq_len, tie_word_embeddings=True)
    return dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=seq_len, tie_word_embeddings=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0], RUNS, "runs/bench/seq_length_warmup.json",
                    "a prepared dataset (default: ./data/bench-<seq_len>, built if missing)")
    p.add_argument("--small", action="store_true", help="a llama 4 layers x 256 on 8 x 512 tokens, warmup from 128 "
                   "(the CPU microbatch-policy comparison)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all --runs, interleaved")
    p.add_argument("--bound", type=float, default=2.0, help="max_microbatch_scale of ours-reshape-bounded")
    add_shape_args(p, skip=("hidden", "intermediate", "heads", "layers"), batch_size="sequences per batch",
                   seq_len="full sequence length (the warmup's max_seq_length)")
    p.add_argument("--warmup-duration", type=float, default=0.3, help="share of the run the warmup lasts")
    p.add_argument("--min-seq-len", type=int)
    p.add_argument("--step-size", type=int)
    args = p.parse_args(argv)
    fill_defaults(args, TINY if args.tiny else SMALL if args.small else FULL)
    finish_args(p, args, RUNS, args.seq_len)
    if any(r.startswith("composer") for r in args.runs):  # Composer's schedule divides by (warmup batches // length updates)
        updates = (args.seq_len - args.min_seq_len) // args.step_size
        if updates and int(args.steps * args.warmup_duration) < updates:
            p.error(f"Composer's SeqLengthWarmup needs at least {updates} warmup batches "
                    f"((seq_len - min_seq_len) // step_size); --steps {args.steps} x {args.warmup_duration} "
                    f"gives {int(args.steps * args.warmup_duration)}")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for two runs to be compared."""
    keys = ("tiny", "small", "bound", "device", "family", "steps", "batch_size", "microbatch", "seq_len", "warmup_duration",
            "min_seq_len", "step_size", "eval_interval", "eval_batches", "precision", "lr", "seed", "threads", "data")
    return {k: getattr(args, k) for k in keys}


# -- one run ------------------------------------------------------------------------------------

def make_algorithms(name: str, args: argparse.Namespace) -> list[Any]:
    if name == "baseline":
        return []
    if name.startswith("composer"):
        from composer.algorithms import SeqLengthWarmup as ComposerSeqLengthWarmup

        return [ComposerSeqLengthWarmup(duration=args.warmup_duration, min_seq_length=args.min_seq_len,
                                        max_seq_length=args.seq_len, step_size=args.step_size,
                                        truncate=name == "composer")]
    from composer_growth import SeqLengthWarmup

    mode, _, policy = name.split("-", 1)[1].partition("-")  # ours-reshape-rows: reshape, rows
    return [SeqLengthWarmup(min_seq_length=args.min_seq_len, max_seq_length=args.seq_len, step_size=args.step_size,
                            duration=args.warmup_duration, schedule="linear", mode=mode,
                            microbatch_policy=policy or "rows", max_microbatch_scale=args.bound)]


def build_trainer(name: str, args: argparse.Namespace, recipe, tokenizer, init_state, eval_loader, recorder,
                  steps: int):
    from composer_growth.recipe.build import build_model

    model = build_model(recipe, tokenizer)
    model.load_state_dict(init_state)
    return bench_trainer(args, model, recipe, eval_loader, recorder, steps, make_algorithms(name, args))


def prime(args: argparse.Namespace, recipe, tokenizer, init_state, eval_loader, steps: int = 3) -> None:
    """A few unrecorded baseline batches, so one-off costs (lazy imports, CUDA/cuBLAS set-up) fall on no run."""
    trainer = build_trainer("baseline", args, recipe, tokenizer, init_state, eval_loader, Recorder(), steps)
    trainer.fit()
    trainer.close()
    del trainer
    gc.collect()


def run_one(name: str, args: argparse.Namespace, recipe, tokenizer, init_state, eval_loader) -> dict[str, Any]:
    gc.collect()
    reset_peak_memory(args.device)
    at_start = torch.cuda.memory_allocated() if args.device == "gpu" else 0
    if at_start > 64 * 2**20:  # a few MiB (cuBLAS workspaces) stay from the priming run on every run
        print(f"WARNING: {at_start / 2**20:.0f} MiB still allocated before {name}: its peak memory counts it",
              flush=True)
    recorder = Recorder()
    trainer = build_trainer(name, args, recipe, tokenizer, init_state, eval_loader, recorder, args.steps)
    if args.device == "gpu":
        trainer.fit()
        memory = peak_memory(args.device)
    else:  # peak resident set size above the run's start (see RESULTS.md: MALLOC_MMAP_THRESHOLD_)
        gc.collect()
        with PeakRSS(interval=0.005) as rss:
            trainer.fit()
        memory = rss.peak - rss.start if rss.peak is not None else None
    composer_tokens = int(trainer.state.timestamp.token)
    trainer.close()
    del trainer
    gc.collect()
    return {
        "evals": recorder.evals, "step_times": recorder.step_times, "step_tokens": recorder.step_tokens,
        "train_time_s": sum(recorder.step_times), "tokens": recorder.tokens, "composer_tokens": composer_tokens,
        "peak_memory": memory, "allocated_at_start": at_start, "first_ids": recorder.first_ids,
    }


# -- summary ------------------------------------------------------------------------------------

def phase_stats(result: dict[str, Any], warmup_batches: int) -> dict[str, Any]:
    """Mean step time and throughput in the warmup batches and after; step 0 (one-off setup) left out."""
    times, tokens = result["step_times"], result["step_tokens"]
    out: dict[str, Any] = {"first_step_s": times[0] if times else None}
    for phase, lo, hi in (("warmup", 1, warmup_batches), ("after", max(1, warmup_batches), len(times))):
        t, n = sum(times[lo:hi]), sum(tokens[lo:hi])
        out[phase] = {"steps": max(0, hi - lo), "mean_step_s": t / (hi - lo) if hi > lo else None,
                      "tokens_per_s": n / t if t > 0 else None}
    return out


def summarize(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    warmup_batches = math.ceil(args.warmup_duration * args.steps - 1e-9)
    base = results.get("baseline")
    target = base["evals"][-1]["loss"] if base and base["evals"] else None
    base_time = time_to_loss(base["evals"], target) if target is not None else None
    base_mem = base["peak_memory"] if base else None
    rows = []
    for name in [r for r in RUNS if r in results]:
        res = results[name]
        res["phases"] = phase_stats(res, warmup_batches)
        res["time_to_target_s"] = time_to_loss(res["evals"], target) if target is not None else None
        res["tokens_to_target"] = time_to_loss(res["evals"], target, "tokens") if target is not None else None
        t = res["time_to_target_s"]
        res["speedup"] = base_time / t if base_time and t else None
        rows.append(table_row(name, res, base_mem))
    return rows


def _fmt(x: Any, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def table_row(name: str, res: dict[str, Any], base_mem: int | None) -> dict[str, str]:
    ph, mem = res["phases"], res["peak_memory"]
    mem_text = "n/a" if mem is None else f"{mem / 2**20:,.0f}"
    if mem is not None and base_mem:
        mem_text += f" ({(mem / base_mem - 1) * 100:+.1f}%)"
    return {
        "run": name,
        "ttt": _fmt(res["time_to_target_s"], ".1f", "not reached"),
        "speedup": _fmt(res["speedup"], ".2f") + ("x" if res["speedup"] else ""),
        "tokens_tt": _fmt(res["tokens_to_target"], ",.0f", "not reached"),
        "loss": _fmt(res["evals"][-1]["loss"] if res["evals"] else None, ".4f"),
        "total": _fmt(res["train_time_s"], ".1f"),
        "step": f"{_fmt(_ms(ph['warmup']['mean_step_s']), '.1f')} / {_fmt(_ms(ph['after']['mean_step_s']), '.1f')}",
        "tps": f"{_fmt(ph['warmup']['tokens_per_s'], ',.0f')} / {_fmt(ph['after']['tokens_per_s'], ',.0f')}",
        "mem": mem_text,
        "tokens": f"{res['tokens']:,}",
        "ctokens": f"{res['composer_tokens']:,}",
    }


COLUMNS = [("run", "run"), ("ttt", "time to baseline's final loss (s)"), ("speedup", "speedup"),
           ("tokens_tt", "tokens to it"), ("loss", "final eval loss"), ("total", "train time (s)"),
           ("step", "mean step ms (warmup / after)"),
           ("tps", "tokens/s (warmup / after)"), ("mem", "peak mem MiB (vs baseline)"),
           ("tokens", "tokens trained"), ("ctokens", "Composer time/token")]


# -- main ---------------------------------------------------------------------------------------



def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tokenizer = set_up(args)
    lr_warmup = f"{max(1, round(0.05 * args.steps))}ba"  # 5% of the run
    recipe = build_recipe_parts(args.family, model_config(args.family, args.seq_len, args.small), args.lr,
                                t_warmup=lr_warmup)
    init_state, n_params = initial_state(recipe, tokenizer, args.seed)
    eval_loader = fixed_eval_loader(args.data, "val", args.batch_size, args.eval_batches, args.seq_len)

    header = (f"seq_length_warmup benchmark on {describe_device(args.device)}\n"
              f"{args.family} {n_params / 1e6:.1f}M params, {args.steps} steps of {args.batch_size} x {args.seq_len}, "
              f"{args.precision}, warmup {args.warmup_duration} of the run from {args.min_seq_len} "
              f"(step {args.step_size}), eval every {args.eval_interval} batches on "
              f"{len(eval_loader.dataset)} x {args.seq_len} validation tokens")
    print(header, flush=True)
    results = load_included(args.include, settings(args)) if args.include else {}
    prime(args, recipe, tokenizer, init_state, eval_loader)
    repeats: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeats):  # variants interleaved: a change in the machine's load hits every one
        for name in args.runs:
            start = time.perf_counter()
            r = run_one(name, args, recipe, tokenizer, init_state, eval_loader)
            r["load"] = os.getloadavg()[0]
            repeats.setdefault(name, []).append(r)
            results[name] = r
            print(f"  {name:20s} final eval loss {r['evals'][-1]['loss']:.4f}, train {r['train_time_s']:.1f} s "
                  f"(wall {time.perf_counter() - start:.1f} s), {r['tokens']:,} tokens, first ids {r['first_ids']}, "
                  f"load {r['load']:.1f}", flush=True)
    if len({tuple(r["first_ids"]) for r in results.values()}) > 1:
        print("WARNING: the runs did not see the same first batch", flush=True)

    rows = summarize(results, args)
    table = markdown_table(rows, COLUMNS)
    if args.repeats > 1:  # every repeat's rows (each against the same repeat's baseline)
        tables = []
        for i in range(args.repeats):
            rows_i = summarize({n: rs[i] for n, rs in repeats.items()}, args)
            for row, n in zip(rows_i, [r for r in RUNS if r in repeats]):
                row["run"] = f"{n} (#{i + 1}, load {repeats[n][i]['load']:.1f})"
            tables.extend(rows_i)
        table = markdown_table(tables, COLUMNS)
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": describe_device(args.device),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "settings": settings(args),
           "params": n_params, "header": header, "runs": results, "repeats": repeats, "table": table}
    write_json(args.out, out)
    print(f"\nresults: {args.out}\ntime to target: training seconds (evals left out) at which the eval loss first "
          "reaches the baseline's final eval loss, interpolated linearly between evals (tokens to it: the same in "
          "tokens trained); speedup = baseline's time / run's. Step means leave out step 0 (one-off setup).\n",
          flush=True)
    print(table, flush=True)
    return out


if __name__ == "__main__":
    main()
