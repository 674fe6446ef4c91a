"""``composer-growth plan --suggest``: G_stack's guideline (when to grow, by how much) next to the recipe's choice.

Du et al., 2024, "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
Pre-Training" (arXiv 2405.15319), as its authors' code repository (github.com/tongxuluo/prts,
README) states it: the growth timing ``d`` (tokens trained before growing) for a target model of
``N`` parameters and a compute budget of ``C`` FLOPs is

    log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74

and the growth factor is fixed at ``g = 4``. ``C = 6 N D`` (``D`` the run's tokens) reproduces the
README's Llama table (e.g. Llama2-7B, 2T tokens: d = 11.11B). The source gives no range of ``N`` and
``C`` within which the fit holds; the paper's runs reach 7B parameters after growth and 750B tokens.
"""

from __future__ import annotations

import math
from typing import Any

#: the growth factor the guideline fixes
GROWTH_FACTOR = 4
#: log10(d) = A log10(N) + B / log10(C) + E
A, B, E = 0.88, 163.27, -5.74
CITATION = 'Du et al. 2024, "Stacking Your Transformers", arXiv 2405.15319'


def growth_timing(n_params: float, flops: float) -> float:
    """G_stack's growth timing d, in tokens, for a target model of ``n_params`` and a budget of ``flops``."""
    return 10 ** (A * math.log10(n_params) + B / math.log10(flops) + E)


def _batch_at(result: dict[str, Any], tokens: float) -> int | None:
    """The first batch end at which the run has trained ``tokens`` tokens (None: not within the run)."""
    segments = result["segments"]
    for i, seg in enumerate(segments):
        end_tokens = segments[i + 1]["tokens"] if i + 1 < len(segments) else result["tokens"]
        if end_tokens >= tokens:
            per_batch = (end_tokens - seg["tokens"]) / seg["batches"]
            return seg["batch"] + max(1, math.ceil((tokens - seg["tokens"]) / per_batch))
    return None


def suggest(result: dict[str, Any]) -> dict[str, Any]:
    """The guideline for the run ``result`` (a :func:`composer_growth.plan.plan_run` result): its N, C, d
    (tokens and batch) and g, and the recipe's own depth growths."""
    n, tokens = result["final_params"], result["tokens"]
    flops = 6.0 * n * tokens
    d = growth_timing(n, flops)
    grown = [e for e in result["events"] if e["event"] == "stack_layers"]
    recipe = [{"batch": e["batch"], "tokens": e["tokens"], "layers": e.get("layers"), "text": e.get("text")}
              for e in grown]
    layers = grown[-1]["layers"][1] if grown and grown[-1].get("layers") else None
    return {"citation": CITATION, "n_params": n, "tokens": tokens, "flops": flops, "d_tokens": d,
            "d_batch": _batch_at(result, d), "g": GROWTH_FACTOR, "final_layers": layers, "recipe": recipe}


def format_suggestion(s: dict[str, Any]) -> str:
    lines = [f"G_stack guideline ({s['citation']}):",
             f"  log10(d) = {A} log10(N) + {B} / log10(C) - {-E}, growth factor g = {GROWTH_FACTOR}",
             f"  N = {s['n_params']:,} parameters (the final model), C = 6 N D = {s['flops']:.4g} FLOPs "
             f"(D = {s['tokens']:,} tokens)"]
    where = (f"batch {s['d_batch']:,}" if s["d_batch"] is not None
             else f"past the end of the run, which trains {s['tokens']:,} tokens")
    lines.append(f"  growth timing d: {s['d_tokens']:.4g} tokens ({where})")
    if not s["recipe"]:
        lines.append("  recipe: no stack_layers growth (the guideline is about depth stacking)")
    for r in s["recipe"]:
        if r["layers"] is None:
            lines.append(f"  recipe: stack_layers {r['text']}")
            continue
        before, after = r["layers"]
        lines.append(f"  recipe: stack_layers at batch {r['batch']:,} ({r['tokens']:,} tokens), layers {before} -> "
                     f"{after} (g = {after / before:g})" + (f"; {r['text']}" if r["text"] else ""))
    if s["final_layers"] is not None:
        small = s["final_layers"] / GROWTH_FACTOR
        lines.append(f"  growth factor g = {GROWTH_FACTOR}: layers {small:g} -> {s['final_layers']}"
                     + ("" if small.is_integer() else " (not a whole number of layers)"))
    lines.append("  the source gives no range of N and C for the fit; the paper's runs reach 7B parameters "
                 "and 750B tokens")
    return "\n".join(lines)
