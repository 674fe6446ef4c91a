r"""When to grow: FLOPs and tokens to the baseline's final eval loss, over several seeds.

Every variant ends as the baseline's model (by default the llama of ``tokens_to_loss.py``: 4 layers x
128, MLP 512, tied embeddings, 1.31M parameters) and trains with a real Composer ``Trainer``, as
``tokens_to_loss.fit`` builds it (DecoupledAdamW, cosine with a 5% warmup to 10% of the peak), on the
same data in the same order within a seed. The seed sets both the model's init and the data order.
The growth variants start from ``1 / --factor`` of the layers and stack them x ``--factor`` (``StackLayers``,
``repeat``, ``function_preserving``) at a time each picks in its own way:

- ``baseline``: the final model from scratch.
- ``fixed@F``: at ``F`` of the run (``--fixed``, shares of the run, e.g. ``0.3,0.6``).
- ``loss``: when the eval loss drops below ``--threshold`` (an ``Orchestrator`` ``stack_layers`` op with
  ``trigger_loss``; ``max_wait_iters`` the latest time, ``--latest``).
- ``plateau``: ``StackLayers`` ``trigger_plateau: {window: --plateau-window, min_delta: --plateau-min-delta}``
  with ``at: --latest`` (the latest time).
- ``plateau-share``: the same with ``min_delta: --plateau-share`` (e.g. ``10%``): the improvement over the
  window below that share of the largest improvement over one window so far.
- ``guide``: at G_stack's growth timing (``composer_growth.suggest.growth_timing``) for the final
  model's N and C = 6 N D (D: the run's tokens); clamped to the last batch of the run when the formula's
  time falls past it (the JSON's ``guide`` says whether it was).

With ``--schedules plain,wc`` each runs twice: as it is, and with ``+wc``: the warmup and context
schedule of ``tokens_to_loss``'s ``combined`` (``ContextLengthSchedule`` 64 tokens with model context
64 for 70%, then 128 with linear RoPE x2; ``SeqLengthWarmup`` 32 -> 64 over the first 30%).

Evals: the Trainer's own evaluator (label ``eval``, the one the triggers read) on fixed validation
rows at the full 128 tokens every ``--eval-interval`` batches and at the end. Tokens and FLOPs are
counted as ``tokens_to_loss``'s ``Counter`` counts them. Each seed's runs are compared with that
seed's ``baseline``: FLOPs and tokens to its final eval loss (linear between evals, ``time_to_loss``),
as a ratio to the baseline's own; and the eval loss at the run's end minus the baseline's eval loss at
the same FLOPs. The results file is rewritten after every run; ``--resume`` continues it.

    python benchmarks/growth_timing.py --seeds 1,2,3 --steps 200 --threshold 6.0 --out runs/bench/growth_timing.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from composer.core import State  # noqa: E402
from composer.loggers import Logger  # noqa: E402

import tokens_to_loss as ttl  # noqa: E402
from common import (build_recipe_parts, describe_device, ensure_data, fixed_eval_loader, loss_at,  # noqa: E402
                    markdown_table, time_to_loss, write_json)

KINDS = ("baseline", "fixed", "loss", "plateau", "plateau-share", "guide")
SCHEDULES = ("plain", "wc")
#: the settings a resumed file must share (a run's result depends on them)
SAME = ("data", "factor", "steps", "batch_size", "eval_interval", "eval_batches", "lr", "hidden", "layers", "mlp",
        "heads", "threshold", "plateau_window", "plateau_min_delta", "plateau_share", "latest")


class StudyCounter(ttl.Counter):
    """``tokens_to_loss``'s Counter, whose eval losses are the Trainer's own evals (label ``eval``)."""

    def __init__(self) -> None:
        super().__init__([], 0)

    def batch_end(self, state: State, logger: Logger) -> None:
        self.train_s += time.perf_counter() - self._t

    def eval_end(self, state: State, logger: Logger) -> None:
        if state.dataloader_label != "eval":
            return
        entry = {"batch": int(state.timestamp.batch), "tokens": self.tokens, "flops": self.flops,
                 "loss": float(state.eval_metric_values["LanguageCrossEntropy"]),
                 "params": sum(p.numel() for p in self._hf(state).parameters())}
        if self.evals and self.evals[-1]["batch"] == entry["batch"]:
            self.evals[-1] = entry
        else:
            self.evals.append(entry)


def run_names(args) -> list[str]:
    kinds = []
    for kind in args.variants:
        kinds += [f"fixed@{f:g}" for f in args.fixed] if kind == "fixed" else [kind]
    return [k + ("+wc" if s == "wc" else "") for s in args.schedules for k in kinds]


def guide_time(args, n_params: int) -> dict[str, Any]:
    """G_stack's growth timing for this final model and budget, as a batch of this run (clamped into it)."""
    from composer_growth.suggest import growth_timing

    tokens = args.steps * args.batch_size * ttl.SEQ
    d = growth_timing(n_params, 6.0 * n_params * tokens)
    batch = math.ceil(d / (args.batch_size * ttl.SEQ))
    return {"n_params": n_params, "tokens": tokens, "flops": 6.0 * n_params * tokens, "d_tokens": d,
            "d_batch": batch, "batch": min(batch, args.steps - 1), "clamped": batch > args.steps - 1}


def make_algorithms(name: str, args, guide: dict[str, Any]) -> list[Any]:
    from composer_growth import Orchestrator, StackLayers

    kind, wc = name.removesuffix("+wc"), name.endswith("+wc")
    algorithms = [ttl.context_schedule(), ttl.seq_warmup(ttl.SEQ // 2)] if wc else []
    stack = dict(mode="repeat", times=args.factor, init="function_preserving")
    if kind.startswith("fixed@"):
        algorithms.append(StackLayers(at=f"{kind[6:]}dur", **stack))
    elif kind.startswith("plateau"):
        delta = args.plateau_share if kind == "plateau-share" else args.plateau_min_delta
        algorithms.append(StackLayers(at=f"{args.latest:g}dur", **stack, trigger_plateau={
            "window": args.plateau_window, "min_delta": delta}))
    elif kind == "guide":
        algorithms.append(StackLayers(at=f"{guide['batch']}ba", **stack))
    elif kind == "loss":
        threshold = args.threshold[1 if wc and len(args.threshold) > 1 else 0]
        algorithms.append(Orchestrator(schedule=[{
            "name": "stack_layers", "value": args.factor, "trigger_loss": threshold,
            "max_wait_iters": int(args.latest * args.steps), "args": {"init": "function_preserving"}}], verbose=False))
    return algorithms


def growth_record(algorithms: list[Any]) -> dict[str, Any] | None:
    """The batch the growth fired at, and why (``at``, ``plateau``, ``loss``, ``timeout``)."""
    from composer_growth import Orchestrator, StackLayers

    for alg in algorithms:
        if isinstance(alg, StackLayers) and alg.record:
            r = alg.record
            return {"batch": r["batch"], "reason": "plateau" if "plateau_eval_batch" in r else "at",
                    "eval_batch": r.get("plateau_eval_batch"), "improvement": r.get("plateau_improvement"),
                    "loss_before": r.get("loss_before"), "loss_after": r.get("loss_after")}
        if isinstance(alg, Orchestrator) and alg.fired:
            r = alg.fired[0]
            return {"batch": r["batch"], "reason": r["reason"], "eval_batch": r["loss_before_batch"],
                    "loss_before": r["loss_before"]}
    return None


def run_one(name: str, seed: int, args, tokenizer, eval_loader, guide: dict[str, Any]) -> dict[str, Any]:
    config = dict(ttl.FINAL)
    if not name.startswith("baseline"):
        config["num_hidden_layers"] //= args.factor
    if name.endswith("+wc"):
        config["max_position_embeddings"] = ttl.SEQ // 2
    algorithms = make_algorithms(name, args, guide)
    counter = StudyCounter()
    fitted = ttl.fit(argparse.Namespace(**{**vars(args), "seed": seed, "device": "cpu", "precision": "fp32"}),
                     tokenizer, config, algorithms, counter, eval_loader)
    return {**ttl.counted(counter, fitted), "growth": growth_record(algorithms)}


# -- the comparison ---------------------------------------------------------------------------------

def compare(run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """One run against its seed's baseline: FLOPs / tokens to the baseline's final loss (ratios to the
    baseline's own), FLOPs trained, and the final loss less the baseline's at the same FLOPs."""
    target = base["evals"][-1]["loss"]
    out = {"final": run["evals"][-1]["loss"], "target": target, "flops_trained": run["flops"] / base["flops"]}
    for key in ("flops", "tokens"):
        mine, theirs = time_to_loss(run["evals"], target, key), time_to_loss(base["evals"], target, key)
        out[f"{key}_to_target"] = mine
        out[f"{key}_ratio"] = None if mine is None else mine / theirs
    same = loss_at(base["evals"], run["flops"], "flops")
    out["gap_at_same_flops"] = None if same is None else out["final"] - same
    return out


def spread(values: list[float | None], fmt: str = "{:.2f}") -> str:
    """``mean (min-max)`` of the values there are, and how many of all are there when some are not."""
    have = [v for v in values if v is not None]
    if not have:
        return "not reached"
    text = fmt.format(statistics.mean(have))
    if len(have) > 1:
        text += f" ({fmt.format(min(have))} to {fmt.format(max(have))})"
    return text + ("" if len(have) == len(values) else f", {len(have)}/{len(values)} seeds")


def summarize(runs: dict[str, dict[str, Any]], names: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per run name: each seed's comparison with its baseline, and the table rows (mean, min to max)."""
    done = [s for s in seeds if str(s) in runs.get("baseline", {})]
    per: dict[str, dict[str, Any]] = {}
    rows, fired_rows = [], []
    for name in names:
        mine = [s for s in done if str(s) in runs.get(name, {})]
        if not mine:
            continue
        per[name] = {str(s): compare(runs[name][str(s)], runs["baseline"][str(s)]) for s in mine}
        c = [per[name][str(s)] for s in mine]
        finals = [x["final"] for x in c]
        growth = [runs[name][str(s)].get("growth") for s in mine]
        std = f", std {statistics.stdev(finals):.4f}" if len(c) > 1 else ""
        rows.append({"run": name, "seeds": len(mine), "final": spread(finals, "{:.4f}") + std,
                     "fl": spread([x["flops_ratio"] for x in c]), "tok": spread([x["tokens_ratio"] for x in c]),
                     "trained": spread([x["flops_trained"] for x in c]),
                     "gap": spread([x["gap_at_same_flops"] for x in c], "{:+.4f}"),
                     "grew": ", ".join("-" if g is None else str(g["batch"]) for g in growth)})
        if any(growth):
            fired_rows.append({"run": name, **{f"s{s}": "-" if g is None else f"{g['batch']} ({g['reason']}"
                                               + ("" if g.get("eval_batch") is None else f", eval {g['eval_batch']}")
                                               + ")" for s, g in zip(mine, growth)}})
    columns = [("run", "run"), ("seeds", "seeds"), ("final", "final eval loss: mean (min to max), std"),
               ("fl", "FLOPs to baseline's final loss / baseline's"), ("tok", "tokens to it / baseline's"),
               ("trained", "FLOPs trained / baseline's"), ("gap", "final loss - baseline's at same FLOPs"),
               ("grew", "grew at batch (per seed)")]
    fired_cols = [("run", "run")] + [(f"s{s}", f"seed {s}: batch (why, eval that decided)") for s in done]
    return {"per_seed": per, "table": markdown_table(rows, columns),
            "growth_table": markdown_table(fired_rows, fired_cols) if fired_rows else ""}


# -- main ---------------------------------------------------------------------------------------

def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="./data/bench-128")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated; each sets the init and the data order")
    p.add_argument("--variants", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="plain (as is), wc (with warmup + context)")
    p.add_argument("--fixed", default="0.3,0.6", help="the fixed growth times, shares of the run")
    p.add_argument("--threshold", help="the loss variant's eval-loss threshold; 'A,B': A plain, B with +wc")
    p.add_argument("--plateau-window", default="0.1dur")
    p.add_argument("--plateau-min-delta", type=float, default=0.01, help="the plateau variant's, in nats")
    p.add_argument("--plateau-share", default="10%", help="the plateau-share variant's min_delta: a share of the "
                   "largest improvement over one window so far")
    p.add_argument("--latest", type=float, default=0.5, help="latest growth of the loss and plateau variants")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-interval", type=int, default=5)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=ttl.FINAL["hidden_size"])
    p.add_argument("--layers", type=int, default=ttl.FINAL["num_hidden_layers"],
                   help="the final layer count (a multiple of --factor)")
    p.add_argument("--factor", type=int, default=2, help="the growth factor: layers at the start x factor = final")
    p.add_argument("--mlp", type=int, default=ttl.FINAL["intermediate_size"])
    p.add_argument("--heads", type=int, default=ttl.FINAL["num_attention_heads"])
    p.add_argument("--include", help="an earlier --out (or partial one) whose runs this one keeps (same settings)")
    p.add_argument("--resume", action="store_true", help="--include the --out file, when it exists")
    p.add_argument("--out", default="runs/bench/growth_timing.json")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    args.schedules = [s for s in args.schedules.split(",") if s]
    args.fixed = [float(f) for f in args.fixed.split(",") if f]
    args.threshold = None if args.threshold is None else [float(t) for t in args.threshold.split(",")]
    if not set(args.variants) <= set(KINDS) or not set(args.schedules) <= set(SCHEDULES):
        p.error(f"--variants from {','.join(KINDS)}; --schedules from {','.join(SCHEDULES)}")
    if "baseline" not in args.variants:
        p.error("--variants: every comparison is with the baseline; include it")
    if "loss" in args.variants and not args.threshold:
        p.error("--threshold: the loss variant needs one (e.g. 6.0, picked from a pilot run)")
    if (args.factor < 2 or args.layers % args.factor or args.hidden % args.heads
            or not all(0 < f < 1 for f in args.fixed)):
        p.error("--factor at least 2, --layers a multiple of it, --hidden a multiple of --heads, "
                "--fixed shares in (0, 1)")
    if args.resume and args.include is None and os.path.exists(args.out):
        args.include = args.out
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    ttl.FINAL.update(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, num_key_value_heads=args.heads)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from composer_growth.recipe.build import build_model

    ensure_data(args.data, ttl.SEQ, 2048, 8_000_000)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.data, "tokenizer"))
    eval_loader = fixed_eval_loader(args.data, "val", args.batch_size, args.eval_batches, ttl.SEQ)
    final = build_model(build_recipe_parts("llama", ttl.FINAL, args.lr, "0.05dur"), tokenizer)
    guide = guide_time(args, sum(p.numel() for p in final.parameters()))
    settings = {k: getattr(args, k) for k in SAME}
    runs: dict[str, dict[str, Any]] = {}
    before = 0.0  # wall seconds of the invocations that wrote the included file
    if args.include:
        with open(args.include) as f:
            earlier = json.load(f)
        # a setting a file from before it existed lacks concerns only variants that file does not hold
        diff = {k: (v, earlier["settings"][k]) for k, v in settings.items()
                if k in earlier["settings"] and earlier["settings"][k] != v}
        if diff:
            raise SystemExit(f"--include {args.include}: settings differ (now, then): {diff}")
        runs, before = earlier["runs"], earlier.get("wall_s", 0.0)
    names = run_names(args)
    print(f"growth_timing on {describe_device('cpu')}: {len(names)} variants x seeds {args.seeds}, {args.steps} steps "
          f"of {args.batch_size} x {ttl.SEQ}; guide {guide}; load {os.getloadavg()}", flush=True)
    start = time.perf_counter()

    def record(complete: bool) -> dict[str, Any]:
        out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": describe_device("cpu"), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
               "settings": settings, "seeds": args.seeds, "names": names, "final_config": ttl.FINAL, "guide": guide,
               "complete": complete, "wall_s": before + time.perf_counter() - start, "runs": runs}
        out.update(summarize(runs, names, args.seeds))
        write_json(args.out, out)
        return out

    for seed in args.seeds:  # seed by seed: a stopped study leaves whole seeds
        for name in names:
            if str(seed) in runs.get(name, {}):
                continue
            r = run_one(name, seed, args, tokenizer, eval_loader, guide)
            runs.setdefault(name, {})[str(seed)] = r
            record(complete=False)
            grew = r["growth"]
            print(f"  seed {seed} {name:14s} final {r['evals'][-1]['loss']:.4f}, {r['flops']:.3e} FLOPs, "
                  f"grew {'-' if grew is None else (grew['batch'], grew['reason'])}, wall {r['wall_s']:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        firsts = {tuple(runs[n][str(seed)]["first_ids"]) for n in names if str(seed) in runs.get(n, {})}
        if len(firsts) > 1:
            print(f"WARNING: seed {seed}: the runs did not see the same first batch", flush=True)
    out = record(complete=True)
    print("\n" + out["table"] + "\n\ngrowth batches:\n" + out["growth_table"], flush=True)
    return out


if __name__ == "__main__":
    main()
