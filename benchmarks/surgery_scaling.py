r"""How growth surgery's time and memory grow with model size: ``stack_layers`` (x2 depth) and
``widen_mlp`` (x1.5 MLP), each followed by ``transfer_optimizer_state``, on llamas from 0.16B to 6.7B.

Two devices, one process:

- ``meta``: the model and its AdamW state on torch's meta device (``plan``'s model: shapes, no
  data). Every tensor operation is free there, so the seconds are the surgery's own bookkeeping
  (modules built, parameters named and mapped, optimizer state rebuilt): the part of the cost that does
  not shrink on a faster device. Every size runs here, 7B included.
- ``cpu``: real fp32 tensors, AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``) filled with random
  values, no gradients; sizes up to ``--cpu-max-params``. Reports the seconds and the resident set size
  before, at its peak during (sampled every ms) and after the surgery. What is moved is bytes: the
  seconds over the model and state's size give a copy rate to set against a GPU's memory bandwidth.

Each row is a fresh model and optimizer, one torch thread.

    python benchmarks/surgery_scaling.py --out runs/bench/surgery_scaling.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import PeakRSS, describe_device, markdown_table, rss_bytes, write_json  # noqa: E402

#: name -> (hidden, layers, intermediate, heads, vocab); untied embeddings
SHAPES = {
    "0.16B": (768, 12, 3072, 12, 32000),
    "0.47B": (1024, 24, 4096, 16, 32000),
    "0.95B": (2048, 16, 5632, 16, 32000),
    "2.7B": (2560, 32, 6912, 20, 32000),
    "6.7B": (4096, 32, 11008, 32, 32000),
}
OPS = ("stack", "widen")


def build(shape: tuple[int, ...], device: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from composer.optim import DecoupledAdamW
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, intermediate, heads, vocab = shape
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    opt = DecoupledAdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    for p in model.parameters():  # the state a Trainer's optimizer holds after some steps
        opt.state[p] = {"step": torch.tensor(2.0), "exp_avg": torch.randn_like(p) * 1e-3,
                        "exp_avg_sq": torch.rand_like(p) * 1e-6}
    return model, opt


def row(name: str, op: str, device: str, seed: int) -> dict[str, Any]:
    from composer_growth.functional.growth import param_names, stack_layers, widen_mlp
    from composer_growth.functional.optim import transfer_optimizer_state

    run_op = {"stack": lambda m: stack_layers(m, mode="repeat", times=2, init="function_preserving"),
              "widen": lambda m: widen_mlp(m, factor=1.5, noise_std=0.0)}[op]
    model, opt = build(SHAPES[name], device, seed)
    before_params = sum(p.numel() for p in model.parameters())
    gc.collect()
    before = rss_bytes() if device == "cpu" else None
    with PeakRSS() as rss:
        start = time.perf_counter()
        names = param_names(model)
        mapping = run_op(model)
        middle = time.perf_counter()
        opt = transfer_optimizer_state(opt, names, model, mapping)
        end = time.perf_counter()
        del names, mapping
    gc.collect()
    after_params = sum(p.numel() for p in model.parameters())
    out = {"model": name, "op": op, "device": device, "params_before": before_params, "params_after": after_params,
           "op_s": middle - start, "transfer_s": end - middle, "total_s": end - start,
           "with_state": sum(1 for p in opt.state if opt.state[p])}
    if device == "cpu":
        after = rss_bytes()
        out.update(rss_before=before, rss_peak=rss.peak, rss_after=after,
                   bytes_after=after_params * 4 * 3)  # fp32 weights and the two moments
        out["gb_per_s"] = out["bytes_after"] / out["total_s"] / 1e9
    del model, opt
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--cpu-max-params", type=float, default=0.5e9, help="real CPU rows only up to this many parameters")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--out", default="runs/bench/surgery_scaling.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        p.error(f"--models: choose from {', '.join(SHAPES)}")
    rows = []
    for device in ("meta", "cpu"):
        for name in models:
            for op in OPS:
                model, _ = build(SHAPES[name], "meta", args.seed)
                size = sum(q.numel() for q in model.parameters())
                del model
                if device == "cpu" and size > args.cpu_max_params:
                    continue
                rows.append(row(name, op, device, args.seed))
                r = rows[-1]
                print(f"{device} {name} {op}: {r['params_before'] / 1e9:.2f}B -> {r['params_after'] / 1e9:.2f}B, "
                      f"op {r['op_s']:.3f} s, optimizer {r['transfer_s']:.3f} s", flush=True)
    table = markdown_table(
        [dict(r, params=f"{r['params_before'] / 1e9:.2f} -> {r['params_after'] / 1e9:.2f}",
              op_s=f"{r['op_s']:.3f}", transfer_s=f"{r['transfer_s']:.3f}", total_s=f"{r['total_s']:.3f}",
              peak=("-" if r.get("rss_peak") is None else f"{(r['rss_peak'] - r['rss_before']) / 2**30:.2f}"),
              moved=("-" if "bytes_after" not in r else f"{r['bytes_after'] / 2**30:.2f}"),
              rate=("-" if "gb_per_s" not in r else f"{r['gb_per_s']:.2f}")) for r in rows],
        [("device", "device"), ("model", "model"), ("op", "op"), ("params", "params before -> after (B)"),
         ("op_s", "op (s)"), ("transfer_s", "optimizer carry (s)"), ("total_s", "total (s)"),
         ("moved", "grown weights + moments (GiB)"), ("peak", "peak RSS - before (GiB)"),
         ("rate", "GB/s of grown state")])
    print("\n" + table)
    write_json(args.out, {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "device": describe_device("cpu"), "load": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
