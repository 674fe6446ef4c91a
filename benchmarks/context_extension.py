"""Context extension, side by side: a phased ``ContextLengthSchedule`` against training at the long length throughout.

One process trains every variant from the same initial weights, on the same data (one dataset prepared
at the LONG length) in the same order, with the same optimizer (DecoupledAdamW) and schedule (cosine with
a 5% warmup), the same tokens per optimizer step, each with a real Composer ``Trainer``:

* ``long``: the long length throughout, no algorithm. Its model declares
  ``max_position_embeddings`` = the long length, default rope (no scaling).
* ``phased``: ``ContextLengthSchedule(mode="reshape")`` for the same ``--steps``: short for 80% of the
  batches, mid for 16%, long for the last 4% with linear rope scaling x2; the model declares
  ``max_position_embeddings`` = the mid length (as ``yamls/context_extension_llama.yaml``). Its batches are
  the long rows cut into 4 (short) and 2 (mid) rows: every token kept, tokens per step equal.
* ``phased-eqtime``: the same schedule over ``ceil(steps x long's train time / phased's train time)``
  batches (so its phases and LR schedule stretch over the longer run), and a callback that calls
  ``state.stop_training()`` once its training time reaches ``long``'s: equal wall time. Needs ``long`` and
  ``phased`` in the same invocation or in ``--include``.

At the end of each run the final model (``phased``: in its last phase's config, linear x2) is evaluated
at every length (short, mid, long) on the same fixed validation tokens (``--eval-batches`` rows of the
long length, cut into rows of each length). Reported per run: those eval losses, mean step time per
phase (grouped by the trained sequence length; step 0 left out), peak memory
(``torch.cuda.max_memory_allocated``; n/a on the CPU), tokens trained, training time (evals left out).

    python benchmarks/context_extension.py --device cpu --tiny        # a few minutes on a CPU
    python benchmarks/context_extension.py --device gpu               # ~91M llama, 512/1024/2048, 1000 steps

Runs can be split over several invocations: ``--include earlier.json`` adds the runs of an earlier
``--out`` file (same settings) to this one's table.
"""

from __future__ import annotations

import argparse
import copy
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
from composer.core import Callback, State  # noqa: E402
from composer.loggers import Logger  # noqa: E402

from common import (Recorder, add_shape_args, base_parser, build_recipe_parts, describe_device,  # noqa: E402
                    fill_defaults, finish_args, fixed_eval_loader, initial_state, load_included, markdown_table,
                    peak_memory, reset_peak_memory, set_up, write_json)

RUNS = ("long", "phased", "phased-eqtime")
SHARES = (0.8, 0.16, 0.04)  # of the run: short, mid, long

FULL = dict(steps=1000, batch_size=16, lengths="512,1024,2048", hidden=768, intermediate=2048, heads=12, layers=12,
            eval_batches=8, precision="amp_bf16", lr=6e-4, vocab_size=8192, max_bytes=150_000_000)
TINY = dict(steps=60, batch_size=16, lengths="32,64,128", hidden=64, intermediate=176, heads=4, layers=2,
            eval_batches=8, precision="fp32", lr=3e-3, vocab_size=2048, max_bytes=8_000_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0], RUNS, "runs/bench/context_extension.json",
                    "a prepared dataset at the long length (default ./data/bench-<long>, built if missing)")
    p.add_argument("--lengths", help="short,mid,long")
    add_shape_args(p, skip=("seq_len", "eval_interval"),
                   batch_size="rows of the LONG length per step (tokens per step = this x long)",
                   microbatch="device_train_microbatch_size at the long length (default: batch)",
                   eval_batches="batches (of --batch-size rows at the long length) per eval length")
    args = p.parse_args(argv)
    fill_defaults(args, TINY if args.tiny else FULL)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    if len(args.lengths) != 3 or not args.lengths[0] < args.lengths[1] < args.lengths[2]:
        p.error("--lengths: three increasing lengths short,mid,long")
    short, mid, long = args.lengths
    if long % mid or long % short or long > 2 * mid:
        p.error("--lengths: short and mid must divide long, and long <= 2 x mid (linear rope x2)")
    finish_args(p, args, RUNS, long)
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("tiny", "device", "steps", "batch_size", "microbatch", "lengths", "hidden", "intermediate", "heads",
            "layers", "eval_batches", "precision", "lr", "seed", "threads", "data")
    return {k: getattr(args, k) for k in keys}


def model_config(args: argparse.Namespace, max_positions: int) -> dict[str, Any]:
    return dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.heads,
                max_position_embeddings=max_positions, tie_word_embeddings=True)


def phases(args: argparse.Namespace) -> list[dict[str, Any]]:
    short, mid, long = args.lengths
    return [
        {"name": f"ctx{short}", "seq_length": short, "duration": f"{SHARES[0]}dur"},
        {"name": f"ctx{mid}", "seq_length": mid, "duration": f"{SHARES[1]}dur"},
        {"name": f"ctx{long}", "seq_length": long, "duration": f"{SHARES[2]}dur",
         "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ]


# -- callbacks ----------------------------------------------------------------------------------

class SeqLens(Callback):
    """The trained sequence length of each batch (at ``BATCH_START``, after the algorithms cut it)."""

    def __init__(self):
        self.lengths: list[int] = []

    def batch_start(self, state: State, logger: Logger) -> None:
        self.lengths.append(int(state.batch["input_ids"].shape[1]))


class StopAt(Callback):
    """``state.stop_training()`` at the first ``BATCH_END`` at which ``recorder.train_time()`` >= ``budget_s``."""

    def __init__(self, recorder: Recorder, budget_s: float):
        self.recorder, self.budget_s = recorder, budget_s
        self.stopped_at: int | None = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.stopped_at is None and self.recorder.train_time() >= self.budget_s:
            self.stopped_at = int(state.timestamp.batch)
            state.stop_training()


# -- one run ------------------------------------------------------------------------------------

def build_trainer(name: str, args: argparse.Namespace, recipe, tokenizer, init_state, callbacks, steps: int):
    from composer import Trainer

    from composer_growth import ContextLengthSchedule
    from composer_growth.data.loaders import build_lm_dataloader
    from composer_growth.recipe.build import build_model, build_optimizer, build_scheduler

    model = build_model(recipe, tokenizer)
    model.load_state_dict(init_state)
    algorithms = []
    if name != "long":
        algorithms = [ContextLengthSchedule(phases=phases(args), save_folder=None, save_checkpoints=False,
                                            export_hf=False, mode="reshape", eval_batches=0, verbose=False)]
    train_loader = build_lm_dataloader(args.data, "train", args.batch_size, shuffle=True, seed=args.seed)
    return Trainer(
        model=model, train_dataloader=train_loader, max_duration=f"{steps}ba",
        optimizers=build_optimizer(recipe, model), schedulers=build_scheduler(recipe),
        algorithms=algorithms, callbacks=callbacks,
        device=args.device, precision=args.precision, device_train_microbatch_size=args.microbatch,
        seed=args.seed, progress_bar=False, log_to_console=False, python_log_level="error",
    )


@torch.no_grad()
def eval_lengths(composer_model, eval_loader, lengths: list[int], args: argparse.Namespace) -> dict[str, float]:
    """Mean LM loss of the model as it is (its current rope config) on the same tokens cut into rows of each length."""
    from composer_growth.unwrap import unwrap_hf

    hf = unwrap_hf(composer_model)
    was_training = hf.training
    hf.eval()
    device = next(hf.parameters()).device
    out = {}
    for length in lengths:
        losses = []
        for batch in eval_loader:
            ids = batch["input_ids"].to(device).reshape(-1, length)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "amp_bf16"):
                losses.append(float(hf(input_ids=ids, labels=ids).loss))
        out[str(length)] = sum(losses) / len(losses)
    hf.train(was_training)
    return out


def run_one(name: str, args: argparse.Namespace, recipe, tokenizer, init_state, eval_loader, steps: int,
            budget_s: float | None = None) -> dict[str, Any]:
    gc.collect()
    reset_peak_memory(args.device)
    recorder, lens = Recorder(), SeqLens()
    callbacks: list[Callback] = [recorder, lens]
    stopper = StopAt(recorder, budget_s) if budget_s is not None else None
    if stopper is not None:
        callbacks.append(stopper)
    trainer = build_trainer(name, args, recipe, tokenizer, init_state, callbacks, steps)
    trainer.fit()
    memory = peak_memory(args.device)
    config = trainer.state.model.model.config if hasattr(trainer.state.model, "model") else None
    rope = {"max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "rope_scaling": copy.deepcopy(getattr(config, "rope_scaling", None))}
    t0 = time.perf_counter()
    losses = eval_lengths(trainer.state.model, eval_loader, args.lengths, args)
    eval_s = time.perf_counter() - t0
    trainer.close()
    del trainer
    gc.collect()
    return {
        "max_duration_ba": steps, "batches": len(recorder.step_times), "budget_s": budget_s,
        "stopped_at_batch": stopper.stopped_at if stopper else None,
        "eval_losses": losses, "eval_s": eval_s, "final_rope": rope,
        "step_times": recorder.step_times, "step_tokens": recorder.step_tokens, "seq_lens": lens.lengths,
        "train_time_s": sum(recorder.step_times), "tokens": recorder.tokens, "peak_memory": memory,
        "first_ids": recorder.first_ids,
    }


def prime(args, recipe, tokenizer, init_state, steps: int = 3) -> None:
    """A few unrecorded batches, so one-off costs (lazy imports, CUDA set-up) fall on no run."""
    trainer = build_trainer("long", args, recipe, tokenizer, init_state, [], steps)
    trainer.fit()
    trainer.close()
    del trainer
    gc.collect()


# -- summary ------------------------------------------------------------------------------------

def phase_steps(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Mean step time per trained sequence length; ``long`` (one length) also on the phased run's batch ranges."""
    times, lens = res["step_times"], res["seq_lens"]
    out: dict[str, Any] = {}
    for length in sorted(set(lens)):
        idx = [i for i, n in enumerate(lens) if n == length and i > 0]
        if idx:
            out[str(length)] = {"steps": len(idx), "mean_step_s": sum(times[i] for i in idx) / len(idx)}
    return out


def _fmt(x: Any, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def table_row(name: str, res: dict[str, Any], args: argparse.Namespace) -> dict[str, str]:
    ph = phase_steps(res, args)
    res["phase_steps"] = ph
    mem = res["peak_memory"]
    steps = " / ".join(f"{L}: {ph[L]['mean_step_s'] * 1000:.1f} ({ph[L]['steps']})" for L in ph)
    row = {"run": name,
           "batches": f"{res['batches']}" + (f" (stopped by budget at {res['stopped_at_batch']} of "
                                              f"{res['max_duration_ba']})" if res.get("stopped_at_batch") else
                                              f" of {res['max_duration_ba']}"),
           "time": f"{res['train_time_s']:.1f}", "steps": steps, "mem": "n/a" if mem is None else f"{mem / 2**20:,.0f}",
           "tokens": f"{res['tokens']:,}"}
    for L in args.lengths:
        row[f"loss{L}"] = _fmt(res["eval_losses"].get(str(L)), ".4f")
    return row


def columns(args: argparse.Namespace) -> list[tuple[str, str]]:
    return ([("run", "run"), ("batches", "batches")] + [(f"loss{L}", f"eval loss @{L}") for L in args.lengths]
            + [("time", "train time (s)"), ("steps", "mean step ms per length (steps)"),
               ("mem", "peak mem MiB"), ("tokens", "tokens trained")])


# -- main ---------------------------------------------------------------------------------------



def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    short, mid, long = args.lengths
    tokenizer = set_up(args, long)
    lr_warmup = "0.05dur"  # 5% of each run (of phased-eqtime's longer run too)
    recipes = {"long": build_recipe_parts("llama", model_config(args, long), args.lr, t_warmup=lr_warmup),
               "phased": build_recipe_parts("llama", model_config(args, mid), args.lr, t_warmup=lr_warmup)}
    recipes["phased-eqtime"] = recipes["phased"]
    init_state, n_params = initial_state(recipes["long"], tokenizer, args.seed)  # rope buffers are not persistent
    eval_loader = fixed_eval_loader(args.data, "val", args.batch_size, args.eval_batches, long)

    header = (f"context_extension benchmark on {describe_device(args.device)}\n"
              f"llama {n_params / 1e6:.1f}M params ({args.layers} layers, {args.hidden} wide), {args.steps} steps of "
              f"{args.batch_size * long:,} tokens ({args.batch_size} x {long}), {args.precision}, lr {args.lr}; "
              f"phased: {short} for {SHARES[0]:.0%}, {mid} for {SHARES[1]:.0%}, {long} with linear rope x2 for "
              f"{SHARES[2]:.0%} (declared context {mid}); long: declared context {long}, no rope scaling; eval on "
              f"{len(eval_loader.dataset) * long:,} validation tokens at each length")
    print(header, flush=True)
    results = load_included(args.include, settings(args)) if args.include else {}
    prime(args, recipes["long"], tokenizer, init_state)
    for name in args.runs:
        steps, budget = args.steps, None
        if name == "phased-eqtime":
            if "long" not in results or "phased" not in results:
                raise SystemExit("phased-eqtime needs the long and phased runs (in --runs before it, or --include)")
            budget = results["long"]["train_time_s"]
            steps = math.ceil(args.steps * budget / results["phased"]["train_time_s"])
            print(f"  phased-eqtime: max_duration {steps}ba, stopped at {budget:.1f} s of training if not done",
                  flush=True)
        start = time.perf_counter()
        results[name] = run_one(name, args, recipes[name], tokenizer, init_state, eval_loader, steps, budget)
        r = results[name]
        print(f"  {name:14s} eval loss {r['eval_losses']}, train {r['train_time_s']:.1f} s over {r['batches']} "
              f"batches (wall {time.perf_counter() - start:.1f} s), {r['tokens']:,} tokens, first ids {r['first_ids']}",
              flush=True)
    if len({tuple(r["first_ids"]) for r in results.values()}) > 1:
        print("WARNING: the runs did not see the same first tokens", flush=True)

    rows = [table_row(name, results[name], args) for name in RUNS if name in results]
    table = markdown_table(rows, columns(args))
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": describe_device(args.device),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "settings": settings(args),
           "params": n_params, "header": header, "runs": results, "table": table}
    write_json(args.out, out)
    print(f"\nresults: {args.out}\neval loss @L: the run's final model (phased: its last phase's config, linear rope "
          "x2) on the same validation tokens cut into rows of L. train time: training seconds, evals left out. "
          "Step means leave out step 0.\n", flush=True)
    print(table, flush=True)
    return out


if __name__ == "__main__":
    main()
