"""The table ``benchmarks/gpu.sh`` prints last: every step, its result and seconds, and its key figures.

    python3 benchmarks/gpu_report.py OUT --smoke warmup,growth,lora,orchestrator,context [--mode GPU]

Reads ``OUT/steps.tsv`` (one line per step the script ran: name, result, seconds, note),
``OUT/smoke.json`` (benchmarks/gpu_smoke.py: one entry per recipe) and ``OUT/bench-{warmup,growth,
combined}.json`` (the benchmarks' ``--out``). The smoke step gets a row for the launcher process and
one per recipe of ``--smoke`` (a recipe without an entry fails: its process ended first); a benchmark
passes when its process did and its JSON holds every run. Writes ``OUT/table.md`` and
``OUT/results.json`` (the rows and the figures behind them); the exit status is 0 when every step passed
(a dry run skips the install).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

GiB = 2**30


def _f(x: Any, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _gib(n: Any) -> str:
    return _f(None if n is None else n / GiB, ".2f")


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


# -- key figures of each step ---------------------------------------------------------------------

def smoke_figures(e: dict[str, Any]) -> str:
    if "batches" not in e:
        return "; ".join(e.get("problems", []))
    events = ", ".join(f"{v['name']}@{v['batch']}" for v in sorted(e["events"], key=lambda v: v["batch"]))
    grew = f", params {e['params_start'] / 1e6:.2f}M -> {e['params_end'] / 1e6:.2f}M" \
        if e["params_start"] != e["params_end"] else ""
    text = (f"{e['batches']} batches, loss {_f(e['loss'], '.3f')}, {e['device']} {e['precision']} {e['attention']}, "
            f"{'fsdp2' if e['fsdp'] else 'no fsdp'} {e['backend']} x{e['world_size']}, peak "
            f"{_f(e['peak_alloc_gib'], '.2f')}{' GiB' if e['peak_alloc_gib'] is not None else ''}{grew}; events {events or 'none'}")
    return text + (f"; PROBLEMS: {'; '.join(e['problems'])}" if e["problems"] else "")


def _tps(run: dict[str, Any]) -> float | None:
    return run["tokens"] / run["train_time_s"] if run.get("train_time_s") else None


def _picked(runs: dict[str, Any], wanted: tuple[str, ...]) -> dict[str, Any]:
    """The ``wanted`` runs of a results file; a missing one fails the row."""
    missing = [r for r in wanted if r not in runs]
    if missing:
        raise ValueError(f"runs missing: {missing}")
    return {name: runs[name] for name in wanted}


def _timed(r: dict[str, Any]) -> dict[str, Any]:
    """The figures every timed run of ``seq_length_warmup.py`` and ``growth.py`` gives."""
    return {"tokens_per_s": _tps(r), "s_per_step": r["train_time_s"] / len(r["step_times"]),
            "peak_memory_bytes": r["peak_memory"], "final_eval_loss": r["evals"][-1]["loss"]}


def warmup_figures(d: dict[str, Any], wanted: tuple[str, ...] = ("baseline", "ours-reshape-tokens")) -> tuple[str, dict]:
    fig = {name: {**_timed(r), "speedup_to_baseline_loss": r.get("speedup")}
           for name, r in _picked(d["runs"], wanted).items()}
    b, o = fig[wanted[0]], fig[wanted[1]]
    text = (f"{wanted[1]} vs baseline: speedup to baseline's loss {_f(o['speedup_to_baseline_loss'], '.2f', 'not reached')}"
            f"{'x' if o['speedup_to_baseline_loss'] else ''}, tokens/s {_f(o['tokens_per_s'], ',.0f')} vs "
            f"{_f(b['tokens_per_s'], ',.0f')} ({_ratio(o['tokens_per_s'], b['tokens_per_s'])}), s/step "
            f"{o['s_per_step']:.4f} vs {b['s_per_step']:.4f}, peak {_gib(o['peak_memory_bytes'])} vs "
            f"{_gib(b['peak_memory_bytes'])} GiB, loss {o['final_eval_loss']:.3f} vs {b['final_eval_loss']:.3f}")
    return text, fig


def growth_figures(d: dict[str, Any], wanted: tuple[str, ...] = ("scratch", "gstack-fp")) -> tuple[str, dict]:
    if "surgery" not in d or "gstack" not in d:
        raise ValueError("surgery or gstack part missing")
    runs = _picked(d["gstack"]["runs"], wanted)
    surgery = {r["ops"]: {"seconds": r["op_s"] + r["transfer_s"], "params_before": r["params_before"],
                          "params_after": r["params_after"], "max_abs_logits_diff": r["max_abs_logits_diff"],
                          "extra_peak_bytes": None if r["memory_peak"] is None or r["memory_before"] is None
                          else r["memory_peak"] - r["memory_before"]} for r in d["surgery"]["rows"]}
    fig = {"surgery": surgery, "gstack": {}}
    for name, r in runs.items():
        fig["gstack"][name] = {"speedup_to_scratch_loss": r.get("speedup"), **_timed(r),
                               "mean_step_ms_before_growth": r.get("mean_step_ms_before"),
                               "mean_step_ms_after_growth": r.get("mean_step_ms_after")}
    s, g = fig["gstack"][wanted[0]], fig["gstack"][wanted[1]]
    ops = ", ".join(f"{k} {v['seconds']:.3f} s (+{_gib(v['extra_peak_bytes'])} GiB, logits diff "
                    f"{v['max_abs_logits_diff']:.1e})" for k, v in surgery.items())
    text = (f"surgery: {ops}; {wanted[1]} vs scratch: speedup to scratch's loss "
            f"{_f(g['speedup_to_scratch_loss'], '.2f', 'not reached')}{'x' if g['speedup_to_scratch_loss'] else ''}, "
            f"s/step {g['s_per_step']:.4f} vs {s['s_per_step']:.4f}, tokens/s {_f(g['tokens_per_s'], ',.0f')} vs "
            f"{_f(s['tokens_per_s'], ',.0f')}, peak {_gib(g['peak_memory_bytes'])} vs {_gib(s['peak_memory_bytes'])} "
            f"GiB, loss {g['final_eval_loss']:.3f} vs {s['final_eval_loss']:.3f}")
    return text, fig


def combined_figures(d: dict[str, Any], wanted: tuple[str, ...] = ("baseline", "combined")) -> tuple[str, dict]:
    fig = {name: {k: r.get(k) for k in ("tokens_to_target", "flops_to_target", "time_to_target_s", "speedup",
                                        "s_per_step", "tokens_per_s", "peak_memory", "tokens", "flops")}
           | {"final_eval_loss": r["evals"][-1]["loss"], "params_start": r["params_start"]}
           for name, r in _picked(d["runs"], wanted).items()}
    b, c = fig[wanted[0]], fig[wanted[1]]
    reached = c["tokens_to_target"] is not None
    to_loss = (f"tokens to baseline's loss {_ratio(c['tokens_to_target'], b['tokens_to_target'])}, FLOPs "
               f"{_ratio(c['flops_to_target'], b['flops_to_target'])}, speedup {_f(c['speedup'], '.2f')}x"
               if reached else "baseline's loss not reached")
    text = (f"combined vs baseline: {to_loss}, FLOPs trained {_ratio(c['flops'], b['flops'])}, s/step "
            f"{_f(c['s_per_step'], '.4f')} vs {_f(b['s_per_step'], '.4f')}, tokens/s {_f(c['tokens_per_s'], ',.0f')} "
            f"vs {_f(b['tokens_per_s'], ',.0f')}, peak {_gib(c['peak_memory'])} vs {_gib(b['peak_memory'])} GiB, "
            f"loss {c['final_eval_loss']:.3f} vs {b['final_eval_loss']:.3f}")
    return text, fig


BENCHES: dict[str, tuple[str, Callable[[dict[str, Any]], tuple[str, dict]]]] = {
    "bench warmup": ("bench-warmup.json", warmup_figures),
    "bench growth": ("bench-growth.json", growth_figures),
    "bench combined": ("bench-combined.json", combined_figures),
}


# -- the rows -------------------------------------------------------------------------------------

def read_steps(out: str) -> list[dict[str, str]]:
    path = os.path.join(out, "steps.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [dict(zip(("step", "result", "seconds", "figures"), (line.rstrip("\n").split("\t") + [""] * 4)[:4]))
                for line in f if line.strip()]


def _load(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def build_rows(out: str, smoke: list[str]) -> tuple[list[dict[str, str]], dict[str, Any]]:
    rows, details = [], {}
    for row in read_steps(out):
        name = row["step"]
        if name == "smoke":
            path = os.path.join(out, "smoke.json")
            entries = {e["step"]: e for e in _load(path)} if os.path.exists(path) else {}
            done = sum(1 for e in entries.values() if e["result"] == "pass")
            rows.append(dict(row, figures=f"composer launcher -n 1, {done} of {len(smoke)} recipes passed"
                             + (f"; {row['figures']}" if row["figures"] else "")))
            for recipe in smoke:
                e = entries.get(f"smoke {recipe}")
                if e is None:
                    rows.append({"step": f"smoke {recipe}", "result": "fail", "seconds": "-",
                                 "figures": f"no result: the smoke process ended first ({row['result']})"})
                    continue
                rows.append({"step": e["step"], "result": e["result"], "seconds": f"{e['seconds']:.1f}",
                             "figures": smoke_figures(e)})
                details[e["step"]] = e
        elif name in BENCHES and row["result"] in ("pass", "fail", "timeout"):
            file, figures = BENCHES[name]
            path = os.path.join(out, file)
            try:
                text, fig = figures(_load(path))
                details[name] = fig
                rows.append(dict(row, figures=text + (f"; {row['figures']}" if row["figures"] else "")))
            except (OSError, ValueError, KeyError, IndexError, TypeError, ZeroDivisionError) as e:
                why = f"no results in {file}" if isinstance(e, OSError) else f"{file}: {type(e).__name__}: {e}"
                rows.append(dict(row, result="fail" if row["result"] == "pass" else row["result"],
                                 figures="; ".join(x for x in (row["figures"], why) if x)))
        else:
            rows.append(row)
    return rows, details


def table(rows: list[dict[str, str]]) -> str:
    lines = ["| step | result | seconds | key figures |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['result']} | {r['seconds']} | {r['figures'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--smoke", default="", help="comma-separated recipe names the smoke step ran")
    p.add_argument("--mode", default="GPU")
    p.add_argument("--wall", type=float, help="the script's seconds so far")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq-len", type=int)
    args = p.parse_args(argv)
    rows, details = build_rows(args.out, [s for s in args.smoke.split(",") if s])
    device = next((d.get("device") for f, _ in BENCHES.values()
                   if os.path.exists(os.path.join(args.out, f)) for d in [_load(os.path.join(args.out, f))]), None)
    header = (f"gpu.sh ({args.mode}) on {device or 'an unknown device'}; benchmarks: {args.steps} steps of "
              f"{args.batch} x {args.seq_len} tokens; wall {_f(args.wall, '.0f')} s")
    text = header + "\n\n" + table(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"header": header, "mode": args.mode, "device": device, "wall_s": args.wall, "rows": rows,
                   "details": details}, f, indent=1)
    print("\n" + text, flush=True)
    dry_install = {("install", "skipped")} if args.mode != "GPU" else set()
    return 0 if all(r["result"] == "pass" or (r["step"], r["result"]) in dry_install for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
