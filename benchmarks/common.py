"""Helpers shared by the side-by-side benchmarks: data, model, a timing callback, memory, tables.

Every benchmark runs its variants one after another in one process, from the same initial
weights, data order, optimizer and schedule, and compares them by ratios.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.utils.data import DataLoader

# -- data ---------------------------------------------------------------------------------------

def set_up(args: Any, seq_len: int | None = None) -> Any:
    """The threads of ``--threads``, the benchmark's dataset (built on first use, with sequences of
    ``seq_len`` tokens, default ``--seq-len``) and its tokenizer."""
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_data(args.data, seq_len or args.seq_len, args.vocab_size, args.max_bytes)
    return AutoTokenizer.from_pretrained(os.path.join(args.data, "tokenizer"))


def set_up_with_eval(args: Any) -> tuple[Any, DataLoader]:
    """:func:`set_up`'s tokenizer and the fixed validation subset (``--eval-batches`` of ``--batch-size``
    rows of ``--seq-len`` tokens)."""
    tokenizer = set_up(args)
    return tokenizer, fixed_eval_loader(args.data, "val", args.batch_size, args.eval_batches, args.seq_len)


def ensure_data(path: str, seq_len: int, vocab_size: int, max_bytes: int) -> str:
    """A prepared dataset at ``path`` (built from this machine's Python source if missing)."""
    from composer_growth.data.prepare import prepare_dataset, read_manifest

    manifest = read_manifest(path)
    if manifest is None:
        manifest = prepare_dataset(path, source="python-source", seq_len=seq_len, vocab_size=vocab_size,
                                   max_bytes=max_bytes)
    if manifest["seq_len"] < seq_len:
        raise SystemExit(f"{path} holds {manifest['seq_len']}-token sequences; --seq-len {seq_len} needs longer")
    train = manifest["splits"]["train"]
    print(f"data: {path}: {train['tokens']:,} training tokens in {train['sequences']:,} sequences of "
          f"{manifest['seq_len']}, {manifest['vocab_size']}-token vocabulary", flush=True)
    return path


def fixed_eval_loader(path: str, split: str, batch_size: int, n_batches: int, seq_len: int) -> DataLoader:
    """The first ``n_batches * batch_size`` sequences of ``split``, read once and kept in memory."""
    from streaming import StreamingDataset

    from composer_growth.data.loaders import lm_collate

    ds = StreamingDataset(local=os.path.join(path, split), split=None, shuffle=False, batch_size=batch_size)
    n = min(len(ds), n_batches * batch_size)
    samples = [{"input_ids": ds[i]["input_ids"][:seq_len]} for i in range(n)]
    del ds
    return DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=lm_collate)


# -- model --------------------------------------------------------------------------------------

def build_recipe_parts(family: str, config: dict[str, Any], lr: float, t_warmup: str, alpha_f: float = 0.1,
                       weight_decay: float = 0.0):
    """A :class:`Recipe` holding only model, optimizer and scheduler, for the project's builders."""
    from composer_growth.recipe.schema import ModelConfig, OptimizerConfig, Recipe, SchedulerConfig

    return Recipe(model=ModelConfig(family=family, config=dict(config)),
                  optimizer=OptimizerConfig(name="decoupled_adamw", lr=lr, betas=[0.9, 0.95],
                                            weight_decay=weight_decay),
                  scheduler=SchedulerConfig(name="cosine_with_warmup", t_warmup=t_warmup, alpha_f=alpha_f))


def initial_state(recipe: Any, tokenizer: Any, seed: int) -> tuple[dict[str, Any], int]:
    """The weights every run of a benchmark starts from (the recipe's model, seeded) and their count."""
    import copy

    from composer.utils import reproducibility

    from composer_growth.recipe.build import build_model

    reproducibility.seed_all(seed)
    model = build_model(recipe, tokenizer)
    return copy.deepcopy(model.state_dict()), sum(p.numel() for p in model.parameters())


# -- measuring ----------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Recorder(Callback):
    """Training wall time with evals left out, each step's time, tokens really trained, eval losses.

    * ``train_time()``: seconds since ``FIT_START``, less the time spent in evals.
    * ``step_times[i]``: batch ``i``'s share of it (``BATCH_END`` to ``BATCH_END``: loading, algorithms,
      forward, backward, optimizer).
    * tokens: ``input_ids.numel()`` at ``BATCH_START`` (after every algorithm has reshaped the batch),
      times the world size (every rank holds the same shape).
    * ``evals``: one entry per eval: batch, train time, real tokens, Composer's ``time/token``, loss.
    """

    def __init__(self, eval_label: str = "eval", metric: str = "LanguageCrossEntropy"):
        self.eval_label, self.metric = eval_label, metric
        self.evals: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.tokens = 0
        self.first_ids: list[int] = []
        self._t0 = self._eval_start = self._last = 0.0
        self._eval_total = 0.0
        self._loss: float | None = None

    def train_time(self) -> float:
        return time.perf_counter() - self._t0 - self._eval_total

    def fit_start(self, state: State, logger: Logger) -> None:
        _sync()
        self._t0 = time.perf_counter()
        self._last = 0.0

    def batch_start(self, state: State, logger: Logger) -> None:
        ids = state.batch["input_ids"]
        if not self.first_ids:
            self.first_ids = ids[0, :8].tolist()  # the same on every run if the data order is the same
        n = int(ids.numel()) * dist.get_world_size()
        self.tokens += n
        self.step_tokens.append(n)

    def batch_end(self, state: State, logger: Logger) -> None:
        _sync()
        now = self.train_time()
        self.step_times.append(now - self._last)
        self._last = now

    def eval_before_all(self, state: State, logger: Logger) -> None:
        _sync()
        self._eval_start = time.perf_counter()

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = state.eval_metrics.get(self.eval_label, {})
        if self.metric in metrics:
            self._loss = float(metrics[self.metric].compute())

    def eval_after_all(self, state: State, logger: Logger) -> None:
        _sync()
        self._eval_total += time.perf_counter() - self._eval_start
        if self._loss is None:
            return
        entry = {"batch": int(state.timestamp.batch), "time_s": self._last, "tokens": self.tokens,
                 "composer_tokens": int(state.timestamp.token), "loss": self._loss}
        if self.evals and self.evals[-1]["batch"] == entry["batch"]:
            self.evals[-1] = entry
        else:
            self.evals.append(entry)
        self._loss = None


# -- memory -------------------------------------------------------------------------------------

def reset_peak_memory(device: str) -> None:
    """Start a peak-memory window (CUDA only)."""
    if device == "gpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int | None:
    """Peak CUDA bytes allocated since :func:`reset_peak_memory`; None on the CPU.

    The CPU has no comparable figure in one process: peak RSS cannot be split by run, and the
    allocator keeps freed pages, so a later run reuses an earlier run's memory.
    """
    return int(torch.cuda.max_memory_allocated()) if device == "gpu" else None


# -- results ------------------------------------------------------------------------------------

def mean_ms(times: list[float]) -> float | None:
    """The mean of ``times`` (seconds) in milliseconds; None for no times."""
    return 1000 * sum(times) / len(times) if times else None


def time_to_loss(evals: list[dict[str, float]], target: float, key: str = "time_s") -> float | None:
    """``key`` (training seconds, tokens, ...) at which the eval loss first reaches ``target``.

    Linear interpolation in (key, loss) between the last eval above the target and the first at or
    below it; the first eval's own value if the first eval is already there; None if never reached.
    """
    prev = None
    for e in evals:
        if e["loss"] <= target:
            if prev is None or prev["loss"] == e["loss"]:
                return e[key]
            share = (prev["loss"] - target) / (prev["loss"] - e["loss"])
            return prev[key] + share * (e[key] - prev[key])
        prev = e
    return None


def describe_device(device: str) -> str:
    if device == "gpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.CalledProcessError):
        name = platform.processor()
    return f"CPU {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; values are printed as they are (format them first)."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# -- added for benchmarks/growth.py -------------------------------------------------------------

def rss_bytes() -> int | None:
    """This process's resident set size now (Linux ``/proc/self/statm``); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakRSS:
    """``with PeakRSS() as m: ...``; then ``m.peak``: the largest RSS seen while the block ran (or None).

    A thread samples :func:`rss_bytes` every ``interval`` seconds (torch kernels release the GIL), so
    a spike shorter than that can be missed. glibc returns large freed blocks to the system, so for
    tensors of more than a few MB this follows what is really held.
    """

    def __init__(self, interval: float = 0.001):
        import threading

        self.interval, self.peak = interval, rss_bytes()
        self.start = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = rss_bytes()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        now = rss_bytes()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)


def loss_at(evals: list[dict[str, float]], x: float, key: str = "time_s") -> float | None:
    """The eval loss at ``key`` = ``x`` (training seconds, batches, ...), interpolated linearly between
    the evals around it; None before the first eval or after the last."""
    for prev, e in zip(evals, evals[1:]):
        if prev[key] <= x <= e[key]:
            share = 0.0 if e[key] == prev[key] else (x - prev[key]) / (e[key] - prev[key])
            return prev["loss"] + share * (e["loss"] - prev["loss"])
    if evals and evals[-1][key] == x:
        return evals[-1]["loss"]
    return None


def load_included(path: str, now: dict[str, Any], section: str | None = None) -> dict[str, dict[str, Any]]:
    """The runs of an earlier results file (or of one ``section`` of it), refused unless made with
    the same settings."""
    with open(path) as f:
        earlier = json.load(f)
    if section is not None:
        earlier = earlier[section]
    then = earlier["settings"]
    if now != then:
        diff = {k: (v, then.get(k)) for k, v in now.items() if then.get(k) != v}
        raise SystemExit(f"--include {path}: settings differ (now, then): {diff}")
    return earlier["runs"]


def bench_trainer(args: Any, model: Any, recipe: Any, eval_loader: DataLoader, recorder: Callback, steps: int,
                  algorithms: list[Any]):
    """A Composer Trainer over ``args.data``'s train split (shuffled by ``args.seed``), evaluating
    ``eval_loader`` every ``args.eval_interval`` batches, with the recipe's optimizer and scheduler."""
    from composer import Trainer
    from composer.core import Evaluator

    from composer_growth.data.loaders import build_lm_dataloader
    from composer_growth.recipe.build import build_optimizer, build_scheduler

    train_loader = build_lm_dataloader(args.data, "train", args.batch_size, shuffle=True, seed=args.seed)
    evaluator = Evaluator(label="eval", dataloader=eval_loader, metric_names=["LanguageCrossEntropy"])
    return Trainer(
        model=model, train_dataloader=train_loader, eval_dataloader=evaluator,
        eval_interval=f"{args.eval_interval}ba", max_duration=f"{steps}ba",
        optimizers=build_optimizer(recipe, model), schedulers=build_scheduler(recipe),
        algorithms=algorithms, callbacks=[recorder],
        device=args.device, precision=args.precision, device_train_microbatch_size=args.microbatch,
        seed=args.seed, progress_bar=False, log_to_console=False, python_log_level="error",
    )


def loss_table(results: dict[str, dict[str, Any]], names: list[str]) -> str:
    """Eval loss (training seconds) of every run at every eval batch."""
    by_batch: dict[int, dict[str, str]] = {}
    for name in names:
        for e in results[name]["evals"]:
            by_batch.setdefault(e["batch"], {"batch": str(e["batch"])})[name] = f"{e['loss']:.4f} ({e['time_s']:.1f} s)"
    return markdown_table([by_batch[b] for b in sorted(by_batch)], [("batch", "batch"), *[(n, n) for n in names]])


def finish_args(parser: Any, args: Any, runs: Any, data_len: int) -> None:
    """The checks and defaults every benchmark's arguments share (runs, device, threads, data)."""
    args.microbatch = args.microbatch or args.batch_size
    args.data = args.data or f"./data/bench-{data_len}"
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in args.runs if r not in runs]
    if bad:
        parser.error(f"--runs: unknown {bad}; choose from {', '.join(runs)}")
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: no CUDA device here (use --device cpu)")
    if args.threads is None and args.device == "cpu":
        args.threads = 1


def fill_defaults(args: Any, preset: dict[str, Any]) -> None:
    """Every option left unset takes the preset's value (``--tiny``'s or the full run's)."""
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


#: the shape options most benchmarks share: flag, help (None: none)
SHAPE_ARGS = (("--batch-size", None), ("--microbatch", "device_train_microbatch_size (default: the batch size)"),
              ("--seq-len", None), ("--hidden", None), ("--intermediate", None), ("--heads", None),
              ("--layers", None), ("--eval-interval", "batches between evals"),
              ("--eval-batches", "batches in the fixed validation subset"))


def add_shape_args(parser: Any, skip: tuple[str, ...] = (), **helps: str) -> None:
    """The integer options of :data:`SHAPE_ARGS` but ``skip`` (their ``dest`` names); ``helps`` gives a
    benchmark's own help text by ``dest``."""
    for flag, text in SHAPE_ARGS:
        dest = flag[2:].replace("-", "_")
        if dest not in skip:
            parser.add_argument(flag, type=int, help=helps.get(dest, text))


def base_parser(description: str, runs: Any, out: str, data_help: str):
    """The flags every training benchmark shares; each adds its own model and schedule flags."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--tiny", action="store_true", help="a tiny llama on short sequences: a quick look on a CPU")
    p.add_argument("--data", help=data_help)
    p.add_argument("--steps", type=int, help="training batches per run")
    p.add_argument("--precision", choices=("fp32", "amp_bf16"))
    p.add_argument("--lr", type=float)
    p.add_argument("--vocab-size", type=int, help="BPE size when the dataset is built here")
    p.add_argument("--max-bytes", type=int, help="source bytes read when the dataset is built here")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 with --device cpu: on a shared, "
                   "busy CPU, more threads than idle cores slow every step many times over)")
    p.add_argument("--runs", default=",".join(runs), help=f"comma-separated subset of {','.join(runs)}")
    p.add_argument("--include", help="an earlier --out file whose runs join this table")
    p.add_argument("--out", default=out, help="JSON results path")
    return p
