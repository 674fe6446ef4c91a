r"""Tokens and training FLOPs each algorithm needs to reach the baseline's final eval loss.

A device-independent comparison: token counts and FLOPs do not depend on timing, so a shared,
busy CPU only costs wall time. One process trains every variant with a real Composer ``Trainer``,
one after another, on the same data in the same order (checked), with the same optimizer
(DecoupledAdamW) and schedule (cosine with a 5% warmup to 10% of the peak). Variants (the final
model is the baseline's: by default a llama 4 layers x 128, MLP 512, tied embeddings, 128-token rows;
``--layers/--hidden/--mlp/--heads`` size it, and the growth variants start from half the layers or
half the MLP):

- ``baseline``: the final model at 128 tokens throughout.
- ``warmup``: ``SeqLengthWarmup`` 32 -> 128 (steps of 32) over the first 30%, reshape.
- ``context``: ``ContextLengthSchedule`` 64 tokens for 70% of the run (model context 64), then 128
  with linear RoPE scaling x2 (the quickstart's schedule).
- ``stack_layers``: half the layers, stacked x2 (``function_preserving``) at 30%.
- ``widen_mlp``: half the MLP, widened x2 at 60% (noise 0.001).
- ``combined``: the quickstart recipe's four algorithms together (half the layers and MLP, context 64;
  warmup 32 -> 64 within the first phase; stack at 30%, widen at 60%; 128 with RoPE x2 at 70%).

``--seq-len`` scales every length with the row (the defaults are for 128 tokens: warmup from a quarter
in steps of a quarter, context half then full). Every ``--eval-interval`` batches and at the end, a
callback evaluates the model as it stands on the same fixed validation rows at the full length
(plain HF forward with labels, no grad, fp32 weights).
Tokens are ``input_ids.numel()`` at ``BATCH_START`` (after the algorithms cut the batch); FLOPs are
``tokens x composer_growth.functional.training_flops_per_token(config, L)`` for the model's config
and row length at that batch (6N plus the attention term). *To target* interpolates linearly
between the evals around the first crossing of the baseline's final eval loss; for a run that trains
fewer FLOPs than the baseline (growth), the last column reads the baseline's eval loss at the
run's total FLOPs (linear between the baseline's evals around it): the comparison at equal compute.
Also per run: training seconds (evals left out; on a GPU synchronised at each batch's start and
end), seconds per step, tokens/s, the time to the baseline's final loss and its speedup over the
baseline (baseline's time / run's), and the peak CUDA memory allocated (None on a CPU).

    python benchmarks/tokens_to_loss.py --steps 100 --eval-interval 10 --eval-batches 2 --out runs/bench/tokens_to_loss.json
    python benchmarks/tokens_to_loss.py --hidden 256 --layers 4 --mlp 1024 --heads 4 --steps 200 \
        --eval-interval 10 --eval-batches 4 --out runs/bench/tokens_to_loss-256.json   # the 4.7M llama
    python benchmarks/tokens_to_loss.py --device gpu --precision amp_bf16 --seq-len 1024 --hidden 768 --layers 12 \
        --mlp 3072 --heads 12 --lr 6e-4 --runs baseline,combined --data ./data/bench-1024   # GPT-2-124M shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from composer.core import Callback, State  # noqa: E402
from composer.loggers import Logger  # noqa: E402

from common import (_sync, build_recipe_parts, describe_device, ensure_data, fixed_eval_loader,  # noqa: E402
                    markdown_table, peak_memory, reset_peak_memory, time_to_loss, write_json)

RUNS = ("baseline", "warmup", "context", "stack_layers", "widen_mlp", "combined")
FINAL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
SEQ = 128  # the default row length; --seq-len sets it


def start_config(name: str) -> dict[str, Any]:
    cfg = dict(FINAL, max_position_embeddings=SEQ)
    if name in ("stack_layers", "combined"):
        cfg["num_hidden_layers"] = FINAL["num_hidden_layers"] // 2
    if name in ("widen_mlp", "combined"):
        cfg["intermediate_size"] = FINAL["intermediate_size"] // 2
    if name in ("context", "combined"):
        cfg["max_position_embeddings"] = SEQ // 2
    return cfg


def context_schedule() -> Any:
    """The quickstart's schedule: half the row (model context half) for 70% of the run, then the full row with
    linear RoPE x2. Its evaluation at the phase's length is off (``eval_labels=()``): every eval is at full length."""
    from composer_growth.algorithms.context_schedule import ContextLengthSchedule

    half = SEQ // 2
    return ContextLengthSchedule(
        phases=[{"name": f"ctx{half}", "seq_length": half, "duration": "0.7dur"},
                {"name": f"ctx{SEQ}", "seq_length": SEQ, "duration": "0.3dur",
                 "rope_scaling": {"rope_type": "linear", "factor": 2.0}}],
        mode="reshape", save_checkpoints=False, export_hf=False, eval_batches=0, eval_labels=(), verbose=False)


def seq_warmup(max_length: int) -> Any:
    """``SeqLengthWarmup`` a quarter of the row -> ``max_length`` (steps of a quarter) over the first 30%, reshape."""
    from composer_growth import SeqLengthWarmup

    quarter = SEQ // 4
    return SeqLengthWarmup(min_seq_length=quarter, max_seq_length=max_length, step_size=quarter, duration="0.3dur",
                           mode="reshape")


def make_algorithms(name: str) -> list[Any]:
    from composer_growth.algorithms.growth import StackLayers, WidenMLP

    stack = lambda: StackLayers(at="0.3dur", mode="repeat", times=2, init="function_preserving")  # noqa: E731
    widen = lambda: WidenMLP(at="0.6dur", factor=2.0, noise_std=0.001)  # noqa: E731
    if name == "baseline":
        return []
    if name == "warmup":
        return [seq_warmup(SEQ)]
    if name == "context":
        return [context_schedule()]
    if name == "stack_layers":
        return [stack()]
    if name == "widen_mlp":
        return [widen()]
    return [context_schedule(), seq_warmup(SEQ // 2), stack(), widen()]


class Counter(Callback):
    """Tokens and FLOPs trained, and eval losses at full length on fixed rows, every ``interval`` batches."""

    def __init__(self, eval_rows: list[torch.Tensor], interval: int):
        self.eval_rows, self.interval = eval_rows, interval
        self.tokens = 0
        self.flops = 0.0
        self.evals: list[dict[str, float]] = []
        self.first_ids: list[int] = []
        self.lengths: list[int] = []
        self.train_s = 0.0
        self.params_start = 0
        self._t = 0.0

    def _hf(self, state: State):
        from composer_growth.unwrap import unwrap_hf

        return unwrap_hf(state.model)

    def fit_start(self, state: State, logger: Logger) -> None:
        self.params_start = sum(p.numel() for p in self._hf(state).parameters())

    def batch_start(self, state: State, logger: Logger) -> None:
        from composer_growth.functional import training_flops_per_token

        ids = state.batch["input_ids"]
        if not self.first_ids:
            self.first_ids = ids[0, :8].tolist()
        n, length = int(ids.numel()), int(ids.shape[1])
        self.tokens += n
        self.flops += n * training_flops_per_token(self._hf(state).config, length)
        self.lengths.append(length)
        _sync()
        self._t = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        _sync()
        self.train_s += time.perf_counter() - self._t
        batch = int(state.timestamp.batch)
        done = state.max_duration is not None and state.timestamp >= state.max_duration
        if batch % self.interval == 0 or done:
            self.evals.append({"batch": batch, "tokens": self.tokens, "flops": self.flops, "time_s": self.train_s,
                               "loss": self.evaluate(state),
                               "params": sum(p.numel() for p in self._hf(state).parameters())})

    @torch.no_grad()
    def evaluate(self, state: State) -> float:
        hf = self._hf(state)
        was = hf.training
        hf.eval()
        device = next(hf.parameters()).device
        losses = [float(hf(input_ids=ids.to(device), labels=ids.to(device)).loss) for ids in self.eval_rows]
        hf.train(was)
        return sum(losses) / len(losses)


def loss_at(evals: list[dict[str, float]], key: str, value: float) -> float | None:
    """The eval loss at ``key == value`` (FLOPs, tokens), linear between the evals around it; None outside them."""
    for prev, e in zip(evals, evals[1:]):
        if prev[key] <= value <= e[key]:
            share = 0.0 if e[key] == prev[key] else (value - prev[key]) / (e[key] - prev[key])
            return prev["loss"] + share * (e["loss"] - prev["loss"])
    return None


def fit(args, tokenizer, config: dict[str, Any], algorithms: list[Any], counter: Counter,
        eval_loader: Any = None) -> float:
    """Train ``config`` (seeded by ``args.seed``: init, data order) for ``args.steps`` batches with a real
    Composer ``Trainer``, ``algorithms`` and ``counter``; with ``eval_loader``, the Trainer also evaluates it
    (label ``eval``) every ``args.eval_interval`` batches. Returns the wall seconds of ``fit``."""
    from composer import Trainer
    from composer.core import Evaluator
    from composer.utils import reproducibility

    from composer_growth.algorithms.composer_hooks import release_finished_trainers
    from composer_growth.data.loaders import build_lm_dataloader, release_shared_memory
    from composer_growth.recipe.build import build_model, build_optimizer, build_scheduler

    recipe = build_recipe_parts("llama", config, args.lr, t_warmup="0.05dur")
    reproducibility.seed_all(args.seed)
    model = build_model(recipe, tokenizer)
    reset_peak_memory(args.device)
    loader = build_lm_dataloader(args.data, "train", args.batch_size, shuffle=True, seed=args.seed)
    evals = {} if eval_loader is None else dict(
        eval_dataloader=Evaluator(label="eval", dataloader=eval_loader, metric_names=["LanguageCrossEntropy"]),
        eval_interval=f"{args.eval_interval}ba")
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f"{args.steps}ba",
                      optimizers=build_optimizer(recipe, model), schedulers=build_scheduler(recipe),
                      algorithms=algorithms, callbacks=[counter], device=args.device, precision=args.precision,
                      device_train_microbatch_size=args.batch_size, seed=args.seed, progress_bar=False,
                      log_to_console=False, python_log_level="error", **evals)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    memory = peak_memory(args.device)
    trainer.close()
    del trainer, model
    release_finished_trainers()  # a study trains dozens of runs in one process
    release_shared_memory()
    return {"wall_s": wall, "peak_memory": memory}


def counted(counter: Counter, fitted: dict[str, Any]) -> dict[str, Any]:
    """What ``counter`` recorded over one run (and ``fit``'s wall time and peak memory), as the results JSON
    holds it."""
    steps = len(counter.lengths)
    return {"evals": counter.evals, "tokens": counter.tokens, "flops": counter.flops, "first_ids": counter.first_ids,
            "lengths": counter.lengths, "train_s": counter.train_s, **fitted,
            "s_per_step": counter.train_s / steps if steps else None,
            "tokens_per_s": counter.tokens / counter.train_s if counter.train_s else None,
            "params_start": counter.params_start,
            "params_end": counter.evals[-1]["params"] if counter.evals else None}


def run_one(name: str, args, tokenizer, eval_rows) -> dict[str, Any]:
    counter = Counter(eval_rows, args.eval_interval)
    return counted(counter, fit(args, tokenizer, start_config(name), make_algorithms(name), counter))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global SEQ
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "amp_bf16"), default="fp32")
    p.add_argument("--seq-len", type=int, default=SEQ, help="row length (a multiple of 4)")
    p.add_argument("--data", help="a prepared dataset (default: ./data/bench-<seq_len>, built if missing)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--hidden", type=int, default=FINAL["hidden_size"], help="the final model's width")
    p.add_argument("--layers", type=int, default=FINAL["num_hidden_layers"], help="the final layer count (even)")
    p.add_argument("--mlp", type=int, default=FINAL["intermediate_size"], help="the final MLP width (even)")
    p.add_argument("--heads", type=int, default=FINAL["num_attention_heads"])
    p.add_argument("--include", help="an earlier --out (or its .partial) whose runs join this table, same settings")
    p.add_argument("--out", default="runs/bench/tokens_to_loss.json")
    args = p.parse_args(argv)
    if args.layers % 2 or args.mlp % 2 or args.hidden % args.heads:
        p.error("--layers and --mlp must be even and --hidden a multiple of --heads (growth starts from halves)")
    if args.seq_len % 4:
        p.error("--seq-len: a multiple of 4 (the warmup starts from a quarter)")
    if args.device == "gpu" and not torch.cuda.is_available():
        p.error("--device gpu: no CUDA device here (use --device cpu)")
    SEQ = args.seq_len
    args.data = args.data or f"./data/bench-{SEQ}"
    FINAL.update(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.heads)
    runs = [r for r in args.runs.split(",") if r]
    assert all(r in RUNS for r in runs), runs
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    ensure_data(args.data, SEQ, 2048, 8_000_000)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.data, "tokenizer"))
    loader = fixed_eval_loader(args.data, "val", args.batch_size, args.eval_batches, SEQ)
    eval_rows = [b["input_ids"] for b in loader]
    print(f"tokens_to_loss on {describe_device(args.device)}: {args.steps} steps of {args.batch_size} x {SEQ}, "
          f"{args.precision}; "
          f"load {os.getloadavg()}", flush=True)
    results: dict[str, Any] = {}
    if args.include:
        with open(args.include) as f:
            earlier = json.load(f)
        same = ("steps", "batch_size", "eval_interval", "eval_batches", "lr", "seed", "hidden", "layers", "mlp", "heads",
                "seq_len", "device", "precision")
        then = {"seq_len": 128, "device": "cpu", "precision": "fp32", **earlier["settings"]}  # files from before these
        if any(then.get(k) != getattr(args, k) for k in same):
            p.error(f"--include {args.include}: other settings ({', '.join(same)} must match)")
        results.update(earlier["runs"])
    for name in runs:
        if name in results:
            continue
        results[name] = r = run_one(name, args, tokenizer, eval_rows)
        write_json(args.out + ".partial", {"settings": vars(args), "runs": results})  # kept if the process stops
        print(f"  {name:13s} final eval loss {r['evals'][-1]['loss']:.4f}, {r['tokens']:,} tokens, "
              f"{r['flops']:.3e} FLOPs, wall {r['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    if len({tuple(r["first_ids"]) for r in results.values()}) > 1:
        print("WARNING: the runs did not see the same first batch", flush=True)
    base = results.get("baseline")
    target = base["evals"][-1]["loss"] if base else None
    rows = []
    for name, r in results.items():
        tok = time_to_loss(r["evals"], target, "tokens") if target is not None else None
        fl = time_to_loss(r["evals"], target, "flops") if target is not None else None
        btok = time_to_loss(base["evals"], target, "tokens") if base else None
        bfl = time_to_loss(base["evals"], target, "flops") if base else None
        sec = time_to_loss(r["evals"], target, "time_s") if target is not None and "time_s" in r["evals"][0] else None
        bsec = time_to_loss(base["evals"], target, "time_s") if sec is not None else None
        base_same = loss_at(base["evals"], "flops", r["flops"]) if base else None
        speedup = bsec / sec if sec and bsec else None
        mem = r.get("peak_memory")
        r.update(tokens_to_target=tok, flops_to_target=fl, baseline_loss_at_same_flops=base_same,
                 time_to_target_s=sec, speedup=speedup)
        rows.append({
            "run": name, "params": f"{r['params_start'] / 1e6:.2f} -> {r['params_end'] / 1e6:.2f}",
            "loss": f"{r['evals'][-1]['loss']:.4f}",
            "tok": "not reached" if tok is None else f"{tok:,.0f}",
            "tokx": "n/a" if tok is None or not btok else f"{tok / btok:.2f}",
            "fl": "not reached" if fl is None else f"{fl:.3e}",
            "flx": "n/a" if fl is None or not bfl else f"{fl / bfl:.2f}",
            "ttok": f"{r['tokens']:,}", "tfl": f"{r['flops']:.3e}",
            "same": "n/a" if base_same is None else f"{base_same:.4f}",
            "step": "n/a" if r.get("s_per_step") is None else f"{r['s_per_step']:.4f}",
            "tps": "n/a" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
            "speedup": "not reached" if speedup is None else f"{speedup:.2f}x",
            "mem": "n/a" if mem is None else f"{mem / 2**30:.2f}",
        })
    columns = [("run", "run"), ("params", "params (M) start -> end"), ("loss", "final eval loss"),
               ("tok", "tokens to baseline's final loss"), ("tokx", "vs baseline"),
               ("fl", "training FLOPs to it"), ("flx", "vs baseline"), ("ttok", "tokens trained"),
               ("tfl", "FLOPs trained"), ("same", "baseline's eval loss at this run's FLOPs"),
               ("step", "s/step"), ("tps", "tokens/s"), ("speedup", "speedup in time to baseline's final loss"),
               ("mem", "peak mem GiB")]
    table = markdown_table(rows, columns)
    curve = ["| batch | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for i, e in enumerate(next(iter(results.values()))["evals"]):
        curve.append(f"| {e['batch']} | " + " | ".join(
            f"{r['evals'][i]['loss']:.4f}" if i < len(r["evals"]) else "" for r in results.values()) + " |")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": describe_device(args.device), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "final_config": FINAL,
           "runs": results, "table": table, "curve": "\n".join(curve)}
    write_json(args.out, out)
    print("\n" + table + "\n\neval loss at full length by batch:\n" + "\n".join(curve), flush=True)
    return out


if __name__ == "__main__":
    main()
