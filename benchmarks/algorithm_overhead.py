"""The algorithms' own cost per training step, measured inside a real Composer Trainer.

Every algorithm of the suite (``seq_length_warmup``, ``context_length_schedule``, ``stack_layers``,
``widen_mlp``, ``lora_merge``, ``orchestrator``, and the first four together) trains a llama on
random tokens, one variant after another in one process, next to a run with no algorithm. A benchmark-side wrapper (nothing in the algorithms)
times each algorithm's ``match`` and ``apply`` (and ``run_event`` of the callbacks the suite adds: the
context schedule's eval and export) at every event with ``time.perf_counter`` and sums
them per step (``BATCH_END`` to ``BATCH_END``), against the step's wall time. Figures are medians over
the idle steps (a busy CPU preempts the process now and then, inside a timed call or not).
The ``noop`` variant is one algorithm that matches no event: its figure is the wrapper's own cost
per algorithm and step, subtracted (times the number of algorithms) in the *net* column.

Each algorithm is set up so that it has nothing left to do after the first steps: the warmup ends
after batch 2, the context schedule's short phase after batch 2 (then the full length, no transition
due), the growth algorithms fire at the second-last ``BATCH_END``, ``lora_merge`` (adapters on every
linear layer from the start) merges there, and the orchestrator's widening times out there (it waits
for an eval loss; the only eval is at the last batch). The *idle* steps measured are
batches 3 to ``steps - 3`` (0-based; step 0, the short warmup/phase batches and the growth batch left out);
*active* is batches 1-2 (the warmup and the short phase cut every batch there).

    python benchmarks/algorithm_overhead.py --models small --repeats 3 --out runs/bench/overhead-small-final.json
    python benchmarks/algorithm_overhead.py --models bench --repeats 1 --out runs/bench/overhead-bench-final.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from composer.core import Algorithm, Callback, Event, State  # noqa: E402
from composer.loggers import InMemoryLogger, Logger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from common import build_recipe_parts, describe_device, markdown_table, set_up, write_json  # noqa: E402

VARIANTS = ("none", "noop", "seq_length_warmup", "context_length_schedule", "stack_layers", "widen_mlp", "lora_merge",
            "orchestrator", "all")
MODELS = {
    # name: (llama config, batch rows, sequence length, steps)
    "small": (dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4), 16, 128, 40),
    "bench": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4), 8, 512, 8),
}
VOCAB = 2048
ACTIVE = (1, 3)  # batches 1 and 2


class StepTimes(Callback):
    """Each step's wall time, BATCH_END to BATCH_END (the first from FIT_START)."""

    def __init__(self, timer: "AlgorithmTimer"):
        self.timer, self.steps, self.alg_s, self.per_event = timer, [], [], []
        self.callbacks_timed = 0
        self._last = 0.0

    def fit_start(self, state: State, logger: Logger) -> None:
        self.callbacks_timed = self.timer.wrap_callbacks(state)
        self._last = time.perf_counter()
        self.timer.reset()

    def batch_end(self, state: State, logger: Logger) -> None:
        now = time.perf_counter()
        self.steps.append(now - self._last)
        self._last = now
        total, events = self.timer.take()
        self.alg_s.append(total)
        self.per_event.append(events)


class AlgorithmTimer:
    """Wraps ``match`` and ``apply`` of each algorithm instance; sums their seconds by event."""

    def __init__(self, algorithms: list[Any]):
        self._events: dict[str, float] = defaultdict(float)
        for alg in algorithms:
            name = type(alg).__name__
            alg.match = self._wrap(alg.match, name, "match")
            alg.apply = self._wrap(alg.apply, name, "apply")

    def _wrap(self, fn, name: str, kind: str):
        events = self._events

        keys: dict[Any, str] = {}

        def timed(event, *args):
            t0 = time.perf_counter()
            try:
                return fn(event, *args)
            finally:
                dt = time.perf_counter() - t0
                key = keys.get(event) or keys.setdefault(event, f"{name}.{kind}({event.value})")
                events[key] += dt

        return timed

    def wrap_callbacks(self, state: State) -> int:
        """Time the suite's own callbacks too (the context schedule adds its eval and export at INIT)."""
        ours = [cb for cb in state.callbacks if type(cb).__module__.startswith("composer_growth")
                and not getattr(cb, "_timed", False)]
        for cb in ours:
            cb.run_event = self._wrap(cb.run_event, type(cb).__name__, "run_event")
            cb._timed = True
        return len(ours)

    def reset(self) -> None:
        self._events.clear()

    def take(self) -> tuple[float, dict[str, float]]:
        out = dict(self._events)
        self._events.clear()
        return sum(out.values()), out


class NoOp(Algorithm):
    """Matches no event: its timed figure is the timing wrapper's own cost per algorithm and step."""

    def match(self, event: Event, state: State) -> bool:
        return False

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        return None


def make_algorithms(variant: str, seq_len: int, steps: int) -> list[Any]:
    from composer_growth import LoraMergeRestart, Orchestrator, SeqLengthWarmup
    from composer_growth.algorithms.context_schedule import ContextLengthSchedule
    from composer_growth.algorithms.growth import StackLayers, WidenMLP

    def warmup(longest=seq_len):  # with the schedule: inside its short phase, as in the quickstart
        return SeqLengthWarmup(min_seq_length=longest // 4, max_seq_length=longest, step_size=longest // 4,
                               duration="2ba", mode="reshape", preallocate=False)

    def schedule():
        return ContextLengthSchedule(phases=[{"name": "short", "seq_length": seq_len // 2, "duration": "3ba"},
                                             {"name": "full", "seq_length": seq_len, "duration": f"{steps - 3}ba"}],
                                     save_checkpoints=False, export_hf=False, eval_batches=0, verbose=False)

    def stack():
        return StackLayers(at=f"{steps - 1}ba", mode="repeat", times=2, init="function_preserving")

    def widen():
        return WidenMLP(at=f"{steps - 1}ba", factor=1.5)

    def lora_merge():  # adapters from the start (see run_variant), one merge at the second-last batch end
        return LoraMergeRestart(interval=f"{steps - 1}ba", prune="magnitude")

    def orchestrator():  # waits for an eval loss that never comes; its timeout fires at the second-last batch end
        return Orchestrator(schedule=[{"name": "widen_mlp", "value": 1.5, "trigger_loss": 0.1,
                                       "max_wait_iters": steps - 1}], verbose=False)

    build = {"lora_merge": [lora_merge], "orchestrator": [orchestrator], "seq_length_warmup": [warmup], "context_length_schedule": [schedule], "stack_layers": [stack],
             "widen_mlp": [widen], "all": [schedule, lambda: warmup(seq_len // 2), stack, widen], "none": [],
             "noop": [NoOp]}[variant]
    return [b() for b in build]


def run_variant(variant: str, model_name: str, tokenizer, threads: int) -> dict[str, Any]:
    from composer import Trainer

    from composer_growth.recipe.build import build_model, build_optimizer, build_scheduler

    cfg, rows, seq_len, steps = MODELS[model_name]
    recipe = build_recipe_parts("llama", dict(cfg, max_position_embeddings=seq_len, tie_word_embeddings=True), 1e-3,
                                t_warmup="1ba")
    torch.manual_seed(0)
    model = build_model(recipe, tokenizer)
    if variant == "lora_merge":
        from composer_growth.unwrap import unwrap_hf
        from composer_growth.functional.lora import add_lora

        add_lora(unwrap_hf(model), "all", rank=8)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (rows * steps, seq_len), generator=g)
    loader = DataLoader([{"input_ids": r, "labels": r.clone()} for r in ids], batch_size=rows, shuffle=False)
    algorithms = make_algorithms(variant, seq_len, steps)
    timer = AlgorithmTimer(algorithms)
    rec = StepTimes(timer)
    evaluation = {}
    if variant == "orchestrator":  # it needs an evaluator: one at the last batch, outside the idle steps
        from composer.core import Evaluator

        evaluation = dict(eval_dataloader=Evaluator(label="eval", dataloader=DataLoader(
            [{"input_ids": r, "labels": r.clone()} for r in ids[:rows]], batch_size=rows),
            metric_names=["LanguageCrossEntropy"]), eval_interval=f"{steps}ba")
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f"{steps}ba", **evaluation,
                      optimizers=build_optimizer(recipe, model), schedulers=build_scheduler(recipe),
                      algorithms=algorithms, callbacks=[rec], loggers=[InMemoryLogger()], device="cpu",
                      precision="fp32", device_train_microbatch_size=rows, seed=17, progress_bar=False,
                      log_to_console=False, python_log_level="error")
    trainer.fit()
    trainer.close()
    idle = list(range(ACTIVE[1], steps - 2))
    keys = {k for i in idle for k in rec.per_event[i]}
    events = {k: statistics.median(rec.per_event[i].get(k, 0.0) for i in idle) for k in keys}
    return {"variant": variant, "model": model_name, "n_algorithms": len(algorithms) + rec.callbacks_timed, "steps": rec.steps, "alg_s": rec.alg_s,
            "idle": idle, "idle_events_s": dict(sorted(events.items(), key=lambda kv: -kv[1])),
            "step_ms": 1000 * statistics.median(rec.steps[i] for i in idle),
            "alg_us": 1e6 * statistics.median(rec.alg_s[i] for i in idle),
            "alg_us_mean": 1e6 * statistics.mean(rec.alg_s[i] for i in idle),
            "active_alg_us": 1e6 * statistics.mean(rec.alg_s[i] for i in range(*ACTIVE))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small,bench", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=2, help="variants interleaved, this many rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default="./data/bench-512",
                   help="a prepared dataset whose tokenizer is used (vocabulary size and special tokens only; the "
                        f"tokens are random); built with a {VOCAB}-token BPE if missing")
    p.add_argument("--tokenizer", help="a tokenizer folder to use instead of --data's")
    p.add_argument("--out", default="runs/bench/algorithm_overhead.json")
    args = p.parse_args(argv)
    if args.tokenizer:
        from transformers import AutoTokenizer

        torch.set_num_threads(args.threads)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:  # the same dataset (and tokenizer) as seq_length_warmup.py --small
        args.seq_len, args.vocab_size, args.max_bytes = 512, VOCAB, 8_000_000
        tokenizer = set_up(args)
    assert len(tokenizer) <= VOCAB + 8, len(tokenizer)
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    print(f"algorithm overhead on {describe_device('cpu')}; load average {os.getloadavg()}", flush=True)
    results: list[dict[str, Any]] = []
    for model_name in models:
        run_variant("none", model_name, tokenizer, args.threads)  # unrecorded: one-off set-up costs
        for r in range(args.repeats):
            for v in variants:
                res = run_variant(v, model_name, tokenizer, args.threads)
                res["repeat"] = r
                res["load"] = os.getloadavg()[0]
                results.append(res)
                print(f"  {model_name} {v:24s} step {res['step_ms']:8.1f} ms, algorithms {res['alg_us']:8.1f} us "
                      f"idle ({100 * res['alg_us'] / 1000 / res['step_ms']:.4f}%), {res['active_alg_us']:8.1f} us "
                      f"active; load {res['load']:.1f}", flush=True)
    rows = []
    for model_name in models:
        for v in variants:
            rs = [r for r in results if r["model"] == model_name and r["variant"] == v]
            if not rs:
                continue
            top = max(rs[-1]["idle_events_s"].items(), key=lambda kv: kv[1], default=("-", 0.0))
            noop = [r["alg_us"] for r in results if r["model"] == model_name and r["variant"] == "noop"]
            wrapper = statistics.median(noop) if noop else 0.0
            net = [max(0.0, r["alg_us"] - r["n_algorithms"] * wrapper) for r in rs]
            rows.append({
                "model": model_name, "variant": v,
                "step": " / ".join(f"{r['step_ms']:.1f}" for r in rs),
                "idle": " / ".join(f"{r['alg_us']:.1f}" for r in rs),
                "share": " / ".join(f"{100 * r['alg_us'] / 1000 / r['step_ms']:.4f}%" for r in rs),
                "net": " / ".join(f"{n:.1f} ({100 * n / 1000 / r['step_ms']:.4f}%)" for n, r in zip(net, rs)),
                "active": " / ".join(f"{r['active_alg_us']:.0f}" for r in rs),
                "top": f"{top[0]} {1e6 * top[1]:.1f} us" if v != "none" else "-",
                "load": " / ".join(f"{r['load']:.1f}" for r in rs),
            })
    columns = [("model", "model"), ("variant", "algorithms"), ("step", "median step ms (idle steps)"),
               ("idle", "algorithms us / step, idle (median)"), ("share", "share of the step, idle"),
               ("net", "idle us net of the wrapper (share)"),
               ("active", "algorithms us / step, active (batches 1-2)"), ("top", "largest idle item (last repeat, median)"),
               ("load", "1-min load")]
    table = markdown_table(rows, columns)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": describe_device("cpu"), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "models": {m: MODELS[m] for m in models}, "results": results, "table": table}
    write_json(args.out, out)
    print("\n" + table, flush=True)
    return out


if __name__ == "__main__":
    main()
