"""Growth: surgery cost on a large llama, and a G_stack recipe against training the large model from scratch.

Two parts (``--part surgery|gstack|all``):

* ``surgery``: a llama (full mode: hidden 2048, 16 layers, MLP 5632, 16 heads, 32000-token vocabulary,
  about 0.95B parameters, fp32) with DecoupledAdamW state from ``--surgery-steps`` real optimizer steps
  (the last step's gradients still held, as in a Trainer at ``BATCH_END``). Then, each on a fresh copy
  of that model and optimizer: ``stack`` (``stack_layers(mode="repeat", times=2,
  init="function_preserving")``), ``widen`` (``widen_mlp(factor=1.5, noise_std=0)``) and
  ``stack+widen`` (the two in a row), each followed by ``transfer_optimizer_state``. Reports seconds
  (op, optimizer transfer), parameters, memory before / peak during / after the surgery (CUDA:
  ``memory_allocated`` and ``max_memory_allocated``; CPU: resident set size, sampled every ms), the
  parameters that carry AdamW state afterwards, and the largest change of the logits on a probe batch
  (function preservation: should be float rounding).
* ``gstack``: real Composer Trainers, one after another in one process, same data in the same order,
  DecoupledAdamW and cosine schedule: ``scratch`` (the large model, ``--layers`` deep, from scratch),
  ``gstack`` (half as deep, ``StackLayers(mode="repeat", times=2, init="copy")`` at ``--growth-at`` of
  the run: G_stack) and ``gstack-fp`` (the same with ``init="function_preserving"``). Every run trains
  the same number of batches on the same schedule (``--growth-steps`` gives the growth runs more), so
  the growth runs finish sooner; compared are the training time (evals left out) to the scratch run's
  final eval loss, and both runs' eval loss at the same training time (the shorter run's end).

    python benchmarks/growth.py --device cpu --tiny --part all          # a few minutes on a CPU
    python benchmarks/growth.py --device gpu --part surgery             # ~1B llama
    python benchmarks/growth.py --device gpu --part gstack              # 768 wide, 12 vs 6 -> 12 layers

Runs can be split over several invocations: ``--include earlier.json`` adds the gstack runs of an
earlier ``--out`` file (same settings) to this one's table.
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

from common import (PeakRSS, Recorder, _sync, add_shape_args, bench_trainer, build_recipe_parts,  # noqa: E402
                    describe_device, fill_defaults, load_included, loss_at, loss_table, markdown_table, mean_ms,
                    peak_memory, reset_peak_memory, rss_bytes, set_up_with_eval, time_to_loss, write_json)

RUNS = {"scratch": None, "gstack": "copy", "gstack-fp": "function_preserving"}  # name -> StackLayers init
SURGERY_OPS = ("stack", "widen", "stack+widen")

FULL = dict(steps=1000, batch_size=32, seq_len=1024, hidden=768, intermediate=2048, heads=12, layers=12,
            eval_interval=50, eval_batches=20, precision="amp_bf16", lr=6e-4, vocab_size=8192,
            max_bytes=150_000_000, surgery_model="2048,16,5632,16,32000", surgery_batch=4, surgery_seq=512)
TINY = dict(steps=80, batch_size=16, seq_len=128, hidden=64, intermediate=176, heads=4, layers=4,
            eval_interval=10, eval_batches=8, precision="fp32", lr=3e-3, vocab_size=2048,
            max_bytes=8_000_000, surgery_model="512,8,1408,8,32000", surgery_batch=2, surgery_seq=64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--tiny", action="store_true", help="small models on short sequences: a quick look on a CPU")
    p.add_argument("--part", choices=("surgery", "gstack", "all"), default="all")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 with --device cpu, as in "
                   "seq_length_warmup.py: on a shared, busy CPU more threads than idle cores slow every step)")
    p.add_argument("--out", default="runs/bench/growth.json", help="JSON results path")
    s = p.add_argument_group("surgery")
    s.add_argument("--surgery-model", help="llama shape: hidden,layers,intermediate,heads,vocab")
    s.add_argument("--surgery-ops", default=",".join(SURGERY_OPS), help=f"comma-separated subset of {SURGERY_OPS}")
    s.add_argument("--surgery-steps", type=int, default=2, help="optimizer steps that create the AdamW state")
    s.add_argument("--surgery-batch", type=int, help="sequences per optimizer step (random tokens)")
    s.add_argument("--surgery-seq", type=int, help="sequence length of those steps and of the probe batch")
    g = p.add_argument_group("gstack")
    g.add_argument("--data", help="a prepared dataset (default: ./data/bench-<seq_len>, built if missing)")
    g.add_argument("--steps", type=int, help="training batches of every run")
    g.add_argument("--growth-steps", type=int, help="training batches of the growth runs (default: --steps)")
    g.add_argument("--growth-at", type=float, default=0.25, help="growth after this share of --steps")
    add_shape_args(g, layers="depth of the large model (the small one has half)")
    g.add_argument("--precision", choices=("fp32", "amp_bf16"))
    g.add_argument("--lr", type=float)
    g.add_argument("--vocab-size", type=int, help="BPE size when the dataset is built here")
    g.add_argument("--max-bytes", type=int, help="source bytes read when the dataset is built here")
    g.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    g.add_argument("--include", help="an earlier --out file whose gstack runs join this table")
    args = p.parse_args(argv)
    fill_defaults(args, TINY if args.tiny else FULL)
    args.surgery_model = [int(x) for x in args.surgery_model.split(",")]
    args.surgery_ops = [o.strip() for o in args.surgery_ops.split(",") if o.strip()]
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if len(args.surgery_model) != 5:
        p.error("--surgery-model: hidden,layers,intermediate,heads,vocab")
    for flag, given, allowed in (("--surgery-ops", args.surgery_ops, SURGERY_OPS), ("--runs", args.runs, RUNS)):
        if [x for x in given if x not in allowed]:
            p.error(f"{flag}: choose from {', '.join(allowed)}")
    if args.layers % 2:
        p.error("--layers: an even depth (G_stack doubles a model half as deep)")
    args.growth_steps = args.growth_steps or args.steps
    args.growth_batch = max(1, round(args.growth_at * args.steps))
    if args.growth_batch >= args.growth_steps:
        p.error("--growth-at: the growth must fall before the end of the growth runs")
    args.microbatch = args.microbatch or args.batch_size
    args.data = args.data or f"./data/bench-{args.seq_len}"
    if args.device == "gpu" and not torch.cuda.is_available():
        p.error("--device gpu: no CUDA device here (use --device cpu)")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    return args


def _fmt(x: Any, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _gib(n: int | None) -> str:
    return _fmt(None if n is None else n / 2**30, ".2f")


# -- part 1: surgery ----------------------------------------------------------------------------

def build_llama(shape: list[int], seq_len: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, intermediate, heads, vocab = shape
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=seq_len, tie_word_embeddings=False)
    with torch.device(device):
        return LlamaForCausalLM(config)


def adamw_state(model: torch.nn.Module, steps: int, batch: int, seq: int, device: str) -> torch.optim.Optimizer:
    """DecoupledAdamW after ``steps`` real steps on random tokens; the last step's gradients stay."""
    from composer.optim import DecoupledAdamW

    opt = DecoupledAdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return opt


def _memory(device: str) -> int | None:
    return torch.cuda.memory_allocated() if device == "cuda" else rss_bytes()


def surgery_row(ops: str, args: argparse.Namespace, shape: list[int], device: str) -> dict[str, Any]:
    """One surgery on a fresh model and optimizer: timings, parameters, memory, logits change."""
    from composer_growth.functional.growth import param_names, stack_layers, widen_mlp
    from composer_growth.functional.optim import transfer_optimizer_state

    run_op = {"stack": lambda m: stack_layers(m, mode="repeat", times=2, init="function_preserving"),
              "widen": lambda m: widen_mlp(m, factor=1.5, noise_std=0.0)}
    torch.manual_seed(args.seed)
    model = build_llama(shape, args.surgery_seq, device)
    params_before = sum(p.numel() for p in model.parameters())
    opt = adamw_state(model, args.surgery_steps, args.surgery_batch, args.surgery_seq, device)
    model.eval()
    probe = torch.randint(0, shape[4], (2, args.surgery_seq), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = model(input_ids=probe).logits
    gc.collect()
    reset_peak_memory("gpu" if device == "cuda" else "cpu")
    before = _memory(device)
    op_s = transfer_s = 0.0
    with PeakRSS() as rss:
        for op in ops.split("+"):
            _sync()
            start = time.perf_counter()
            names = param_names(model)
            mapping = run_op[op](model)
            _sync()
            middle = time.perf_counter()
            opt = transfer_optimizer_state(opt, names, model, mapping)  # the old optimizer goes here
            _sync()
            op_s, transfer_s = op_s + middle - start, transfer_s + time.perf_counter() - middle
            del names, mapping
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    gc.collect()
    after = _memory(device)
    with torch.no_grad():
        diff = (model(input_ids=probe).logits - ref).abs().max().item()
    row = {"ops": ops, "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
           "params_with_state": sum(p.numel() for p in opt.state if opt.state[p]),
           "op_s": op_s, "transfer_s": transfer_s, "memory_before": before, "memory_peak": peak,
           "memory_after": after, "max_abs_logits_diff": diff, "max_abs_logit": ref.abs().max().item()}
    del model, opt, ref, probe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


SURGERY_COLUMNS = [("ops", "surgery"), ("params", "params before -> after (M)"),
                   ("state", "params with AdamW state (M)"),
                   ("op", "op (s)"), ("transfer", "optimizer transfer (s)"), ("total", "total (s)"),
                   ("before", "memory before (GiB)"), ("peak", "peak during (GiB)"),
                   ("extra", "peak - before (GiB)"), ("after", "after (GiB)"), ("diff", "max abs logits diff")]


def surgery_table_row(r: dict[str, Any]) -> dict[str, str]:
    extra = None if r["memory_peak"] is None or r["memory_before"] is None else r["memory_peak"] - r["memory_before"]
    return {"ops": r["ops"], "params": f"{r['params_before'] / 1e6:,.1f} -> {r['params_after'] / 1e6:,.1f}",
            "state": f"{r['params_with_state'] / 1e6:,.1f}", "op": f"{r['op_s']:.3f}",
            "transfer": f"{r['transfer_s']:.3f}", "total": f"{r['op_s'] + r['transfer_s']:.3f}",
            "before": _gib(r["memory_before"]), "peak": _gib(r["memory_peak"]), "extra": _gib(extra),
            "after": _gib(r["memory_after"]), "diff": f"{r['max_abs_logits_diff']:.2e}"}


def run_surgery(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if args.device == "gpu" else "cpu"
    memory = "CUDA memory_allocated / max_memory_allocated" if device == "cuda" else "process RSS (sampled every ms)"
    header = (f"surgery on {describe_device(args.device)}: llama hidden,layers,intermediate,heads,vocab = "
              f"{','.join(map(str, args.surgery_model))}, fp32, DecoupledAdamW state after {args.surgery_steps} "
              f"steps of {args.surgery_batch} x {args.surgery_seq} (gradients kept); a fresh model per row; "
              f"memory: {memory}")
    print(header, flush=True)
    # one-off costs (kernels, lazy imports) on a 2-layer model first, unrecorded
    small = [64, 2, 128, 4, 256]
    for ops in args.surgery_ops:
        surgery_row(ops, argparse.Namespace(**{**vars(args), "surgery_steps": 1}), small, device)
    rows = []
    for ops in args.surgery_ops:
        rows.append(surgery_row(ops, args, args.surgery_model, device))
        print(f"  {ops:12s} {rows[-1]['op_s'] + rows[-1]['transfer_s']:.3f} s", flush=True)
    table = markdown_table([surgery_table_row(r) for r in rows], SURGERY_COLUMNS)
    return {"header": header, "rows": rows, "table": table}


# -- part 2: G_stack against scratch ------------------------------------------------------------

def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("steps", "growth_steps", "growth_batch", "batch_size", "microbatch", "seq_len", "hidden", "intermediate",
            "heads", "layers", "eval_interval", "eval_batches", "precision", "lr", "seed", "data", "device")
    return {k: getattr(args, k) for k in keys}


def build_trainer(name: str, args: argparse.Namespace, tokenizer, eval_loader, recorder, steps: int):
    from composer.utils import reproducibility

    from composer_growth import StackLayers
    from composer_growth.recipe.build import build_model

    init = RUNS[name]
    layers = args.layers if init is None else args.layers // 2
    config = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    lr_warmup = f"{max(1, round(0.05 * args.steps))}ba"  # 5% of the run
    recipe = build_recipe_parts("llama", config, args.lr, t_warmup=lr_warmup)
    reproducibility.seed_all(args.seed)
    model = build_model(recipe, tokenizer)
    algorithms = [] if init is None else [StackLayers(at=f"{args.growth_batch}ba", mode="repeat", times=2, init=init)]
    return bench_trainer(args, model, recipe, eval_loader, recorder, steps, algorithms)


def run_one(name: str, args: argparse.Namespace, tokenizer, eval_loader, steps: int) -> dict[str, Any]:
    gc.collect()
    reset_peak_memory(args.device)
    recorder = Recorder()
    trainer = build_trainer(name, args, tokenizer, eval_loader, recorder, steps)
    params_start = sum(p.numel() for p in trainer.state.model.parameters())
    trainer.fit()
    growth = dict(trainer.state.algorithms[0].record) if trainer.state.algorithms else {}
    result = {
        "evals": recorder.evals, "step_times": recorder.step_times, "step_tokens": recorder.step_tokens,
        "train_time_s": sum(recorder.step_times), "tokens": recorder.tokens, "first_ids": recorder.first_ids,
        "params_start": params_start, "params_end": sum(p.numel() for p in trainer.state.model.parameters()),
        "growth": growth, "peak_memory": peak_memory(args.device),
    }
    trainer.close()
    del trainer
    gc.collect()
    return result


def summarize(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, str]]:
    base = results.get("scratch")
    target = base["evals"][-1]["loss"] if base else None
    base_time = time_to_loss(base["evals"], target) if base else None
    rows = []
    for name in [r for r in RUNS if r in results]:
        res = results[name]
        g = res["growth"].get("batch", args.growth_batch)  # the growth ran at the end of batch g (index g - 1)
        res["mean_step_ms_before"] = mean_ms(res["step_times"][1:g - 1])  # step 0: one-off set-up
        res["mean_step_ms_after"] = mean_ms(res["step_times"][g:])  # the growth batch itself left out
        res["growth_step_ms"] = 1000 * res["step_times"][g - 1] if len(res["step_times"]) >= g else None
        t = time_to_loss(res["evals"], target) if base else None
        res["time_to_target_s"], res["speedup"] = t, (base_time / t if base_time and t else None)
        res["batches_to_target"] = time_to_loss(res["evals"], target, "batch") if base else None
        res["tokens_to_target"] = time_to_loss(res["evals"], target, "tokens") if base else None
        same = min(res["evals"][-1]["time_s"], base["evals"][-1]["time_s"]) if base else None
        res["equal_time"] = {"time_s": same, "loss": loss_at(res["evals"], same) if base else None,
                             "scratch_loss": loss_at(base["evals"], same) if base else None}
        gr = res["growth"]
        rows.append({
            "run": name,
            "layers": f"{args.layers}" if RUNS[name] is None else f"{args.layers // 2} -> {args.layers}",
            "ttt": _fmt(t, ".1f", "not reached"),
            "speedup": _fmt(res["speedup"], ".2f") + ("x" if res["speedup"] else ""),
            "btt": _fmt(res["batches_to_target"], ".0f", "not reached"),
            "loss": f"{res['evals'][-1]['loss']:.4f}",
            "total": f"{res['train_time_s']:.1f}",
            "equal": f"{_fmt(res['equal_time']['loss'], '.4f')} / {_fmt(res['equal_time']['scratch_loss'], '.4f')} "
                     f"@ {_fmt(same, '.1f')} s",
            "surgery": _fmt(gr.get("seconds"), ".3f", "-"),
            "probe": f"{gr['loss_before']:.3f} -> {gr['loss_after']:.3f}" if "loss_before" in gr else "-",
            "step": f"{_fmt(res['mean_step_ms_before'], '.1f')} / {_fmt(res['mean_step_ms_after'], '.1f')}",
            "mem": _fmt(None if res["peak_memory"] is None else res["peak_memory"] / 2**20, ",.0f"),
        })
    return rows


GSTACK_COLUMNS = [("run", "run"), ("layers", "layers"), ("ttt", "time to scratch's final loss (s)"),
                  ("speedup", "speedup"), ("btt", "batches to it"), ("loss", "final eval loss"),
                  ("total", "train time (s)"), ("equal", "eval loss at equal time: run / scratch"),
                  ("surgery", "surgery (s)"), ("probe", "train loss before -> after growth"),
                  ("step", "mean step ms before / after growth"), ("mem", "peak mem MiB")]


def loss_over_time(results: dict[str, dict[str, Any]]) -> str:
    """Eval loss (training seconds) of every run at every eval batch."""
    return loss_table(results, [r for r in RUNS if r in results])


def run_gstack(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer, eval_loader = set_up_with_eval(args)
    header = (f"gstack on {describe_device(args.device)}: llama {args.hidden} wide (MLP {args.intermediate}, "
              f"{args.heads} heads, tied embeddings), scratch {args.layers} layers for {args.steps} batches; "
              f"G_stack {args.layers // 2} -> {args.layers} layers after batch {args.growth_batch} of "
              f"{args.growth_steps}; batches of {args.batch_size} x {args.seq_len}, {args.precision}, lr {args.lr}, "
              f"eval every {args.eval_interval} batches on {len(eval_loader.dataset)} x {args.seq_len} "
              "validation tokens")
    print(header, flush=True)
    results: dict[str, Any] = {}
    if args.include:
        results.update(load_included(args.include, settings(args), section="gstack"))
    run_one("scratch", args, tokenizer, eval_loader, steps=3)  # unrecorded: one-off set-up falls on no run
    for name in args.runs:
        start = time.perf_counter()
        results[name] = r = run_one(name, args, tokenizer, eval_loader,
                                    args.steps if RUNS[name] is None else args.growth_steps)
        print(f"  {name:10s} final eval loss {r['evals'][-1]['loss']:.4f}, train {r['train_time_s']:.1f} s "
              f"(wall {time.perf_counter() - start:.1f} s), params {r['params_start']:,} -> {r['params_end']:,}, "
              f"first ids {r['first_ids']}", flush=True)
    if len({tuple(r["first_ids"]) for r in results.values()}) > 1:
        print("WARNING: the runs did not see the same first batch", flush=True)
    table = markdown_table(summarize(results, args), GSTACK_COLUMNS)
    return {"header": header, "settings": settings(args), "runs": results, "table": table,
            "loss_table": loss_over_time(results)}


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                           "device": describe_device(args.device),
                           "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    if args.part in ("surgery", "all"):
        out["surgery"] = run_surgery(args)
    if args.part in ("gstack", "all"):
        out["gstack"] = run_gstack(args)
    write_json(args.out, out)
    print(f"\nresults: {args.out}", flush=True)
    if "surgery" in out:
        print(f"\n{out['surgery']['header']}\n\n{out['surgery']['table']}", flush=True)
    if "gstack" in out:
        print(f"\n{out['gstack']['header']}\ntime to target: training seconds (evals left out) at which the eval "
              "loss first reaches the scratch run's final eval loss, interpolated between evals; speedup = "
              "scratch's time / run's. Equal time: both runs' eval loss, interpolated, at the shorter run's "
              "training time. Step means leave out step 0 and the growth batch.\n", flush=True)
        print(out["gstack"]["loss_table"] + "\n\n" + out["gstack"]["table"], flush=True)
    return out


if __name__ == "__main__":
    main()
