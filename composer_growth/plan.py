"""``composer-growth plan``: what a recipe will do, from the recipe alone (no data read, no training, no GPU).

The run's facts (max duration, batch size, the data's sequence length from its manifest, the model
config) drive a batch-by-batch walk of the run's clock. At each batch every algorithm answers with
its own functions (the same ones it calls in training, on that clock instead of the Trainer's
state), through :class:`composer_growth.algorithms.base.SuiteAlgorithm`: the sequence length
(``plan_length``), the LR factor (``plan_lr``), and growth, LoRA starts and merges and orchestrator
timeouts (``plan_events``, on a model built on the meta device); the context schedule adds its
phase and RoPE (``phase_index``, ``plan_rope``) and, for a phase on its own dataset, the rows and row
length of that phase's loader (``plan_batch``, the rows the run's loader gets). Each batch counts
the tokens the run counts (the tokens trained), so phases and runs measured in tokens end where the
run's do. The result is a timeline of segments (a new one wherever something changes), the events,
and the training FLOPs against the same tokens without the suite's algorithms, on the starting
model and on the final one (growth's real alternative).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from composer.core import TimeUnit

from composer_growth.errors import ConfigError, check_int
from composer_growth.families import config_get, family_of
from composer_growth.functional.flops import meta_model
from composer_growth.runfacts import RunFacts
from composer_growth.timeutil import parse_time

#: a run longer than this is walked in strides (events still land on their batch)
MAX_WALK = 2_000_000


class Clock:
    """The run's time at a batch boundary, read as :func:`composer_growth.timeutil.elapsed` reads a State."""

    def __init__(self, facts: RunFacts):
        self.facts = facts
        self.batch = 0
        self.tokens = 0
        self.samples = 0

    def __call__(self, unit: TimeUnit) -> float:
        md = self.facts.max_duration
        if unit == TimeUnit.DURATION:
            if md.unit == TimeUnit.EPOCH and self.facts.batches_per_epoch:
                return self.batch / (self.facts.batches_per_epoch * float(md.value))
            return self(md.unit) / float(md.value)
        if unit == TimeUnit.BATCH:
            return float(self.batch)
        if unit == TimeUnit.TOKEN:
            return float(self.tokens)
        if unit == TimeUnit.SAMPLE:
            return float(self.samples)
        if unit == TimeUnit.EPOCH:
            n = self.facts.batches_per_epoch
            if n is None:
                raise ConfigError("max_duration", str(md), "an epoch's length is unknown (no manifest): use ba, tok or sp")
            return self.batch / n
        raise ConfigError("time", unit.value, "a unit in dur, ba, tok, sp or ep")

    def done(self) -> bool:
        return self(self.facts.max_duration.unit) >= float(self.facts.max_duration.value)


# --------------------------------------------------------------------------- facts


def facts_from_recipe(plan: Any) -> RunFacts:
    """The facts of a validated recipe (:func:`composer_growth.recipe.validate`), as its algorithms saw them."""
    facts = plan.facts if plan.facts is not None else RunFacts.from_recipe(plan.recipe, plan.world_size)
    r = plan.recipe
    if facts.data_seq_len is None:
        raise ConfigError("data.path", r.data.path, "a prepared dataset (manifest.json) or data.prepare")
    if facts.model_config is None:
        raise ConfigError("model", r.model.pretrained or r.model.family, "a model whose config can be built")
    return facts


def _foundry_config(model: dict[str, Any], max_seq_len: int) -> Any:
    name = model.get("name")
    if name == "hf_causal_lm":
        from transformers import AutoConfig

        path = model.get("pretrained_model_name_or_path")
        if path is None or not os.path.exists(path):
            raise ConfigError("model.pretrained_model_name_or_path", path, "a local model folder (plan downloads nothing)")
        config = AutoConfig.from_pretrained(path)
        for key, value in (model.get("config_overrides") or {}).items():
            setattr(config, key, value)
        return config
    if name == "mpt_causal_lm":
        try:
            from llmfoundry.models.mpt import MPTConfig
        except ImportError:
            raise ConfigError("model.name", name, "needs llm-foundry installed (its MPTConfig)") from None

        skip = {"name", "init_device", "pretrained", "pretrained_model_name_or_path"}
        kwargs = {k: v for k, v in model.items() if k not in skip}
        kwargs.setdefault("max_seq_len", max_seq_len)
        return MPTConfig(**kwargs)
    raise ConfigError("model.name", name, "hf_causal_lm (with a local config) or mpt_causal_lm")


def is_foundry(data: dict[str, Any]) -> bool:
    """Whether a YAML mapping is an llm-foundry train YAML (rather than one of our recipes)."""
    return "train_loader" in data or "max_seq_len" in data


def foundry_run(data: dict[str, Any]) -> tuple[RunFacts, list[tuple[str, Any]]]:
    """The facts and our algorithms of an llm-foundry train YAML (``algorithms:``, ``max_duration``,
    ``global_train_batch_size``, ``max_seq_len``, ``model``)."""
    from composer_growth.recipe.build import construct, load_all
    from composer_growth.registry import ALGORITHMS

    load_all()
    max_seq_len = data.get("max_seq_len")
    check_int(max_seq_len, "max_seq_len")
    gbs = data.get("global_train_batch_size")
    check_int(gbs, "global_train_batch_size", minimum=1, allowed="a positive integer")
    model = dict(data.get("model") or {})
    if model.get("name") == "mpt_causal_lm" and model.get("peft_config") is not None:
        raise ConfigError("model.peft_config", model["peft_config"], "llm-foundry's mpt_causal_lm ignores it: "
                          "lora_merge.start_at or stack_layers.stack_lora add adapters to MPT, or use hf_causal_lm "
                          "with peft_config")
    config = _foundry_config(model, max_seq_len)
    if getattr(config, "vocab_size", None) is None:
        raise ConfigError("model.vocab_size", None, "needed to count parameters")
    algs = [(name, construct("algorithms", name, ALGORITHMS, dict(kw or {})))
            for name, kw in (data.get("algorithms") or {}).items() if name in ALGORITHMS]
    facts = RunFacts(max_duration=parse_time(str(data.get("max_duration")), "max_duration"), global_batch=gbs,
                     data_seq_len=max_seq_len, model_config=config, origin="foundry",
                     source=str(data.get("run_name") or ""))
    return facts, algs


def validate_foundry(data: dict[str, Any]) -> tuple[RunFacts, list[tuple[str, Any]]]:
    """:func:`foundry_run` with every algorithm of the suite checked against the run's facts, as at
    ``Event.INIT`` (the model's config, positions, duration and batch)."""
    from composer_growth.recipe.build import validate_algorithm

    facts, algs = foundry_run(data)
    for name, alg in _suite(algs):
        validate_algorithm(name, alg, facts)
    return facts, algs


# --------------------------------------------------------------------------- the walk


def _shape(model: Any) -> dict[str, int]:
    family = family_of(model.config, key="model")
    config = model.config
    return {"layers": int(config_get(config, family.num_layers_key)), "mlp_width": family.intermediate_size(config),
            "params": int(sum(p.numel() for p in model.parameters())),
            "trainable": int(sum(p.numel() for p in model.parameters() if p.requires_grad))}


def _flops_per_token(model: Any, seq_len: int) -> int:
    from composer_growth.functional.flops import training_flops_per_token

    return int(training_flops_per_token(model.config, seq_len))


def _suite(algorithms: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The algorithms of the suite among ``algorithms`` (others have no schedule to walk)."""
    from composer_growth.algorithms.base import SuiteAlgorithm

    return [(n, a) for n, a in algorithms if isinstance(a, SuiteAlgorithm)]


def plan_run(facts: RunFacts, algorithms: list[tuple[str, Any]]) -> dict[str, Any]:
    """Walk the run batch by batch; return segments, events and FLOPs totals (a JSON-able mapping)."""
    from composer_growth.algorithms.context_schedule import ContextLengthSchedule
    from composer_growth.recipe.build import validate_algorithm

    md = facts.max_duration
    for name, alg in _suite(algorithms):
        if alg.run_facts is not facts:  # a recipe's algorithms were checked by validate
            validate_algorithm(name, alg, facts)
    suite = [(n, a) for n, a in _suite(algorithms) if a.enabled]
    schedule = next((a for _, a in suite if isinstance(a, ContextLengthSchedule)), None)
    lengths = sorted((a for _, a in suite if a.length_rank is not None), key=lambda a: a.length_rank)
    records: dict[int, dict[str, Any]] = {id(a): {} for _, a in suite}  # each algorithm's scratch space

    model = meta_model(facts.model_config)
    clock = Clock(facts)
    gbs, full = facts.global_batch, facts.data_seq_len
    segments: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    shape = _shape(model)
    flops_cache: dict[tuple[int, int, int], int] = {}

    def flops(length: int) -> int:
        key = (id(model), shape["params"], length)
        if key not in flops_cache:
            flops_cache[key] = _flops_per_token(model, length)
        return flops_cache[key]

    total = 0.0
    phase_index = None
    while not clock.done():
        if clock.batch >= MAX_WALK:
            raise ConfigError("max_duration", str(md), f"at most {MAX_WALK} batches for a plan")
        b = clock.batch
        # BEFORE_DATALOADER / AFTER_DATALOADER: phase, then lengths in the suite's one order
        info: dict[str, Any] = {}
        mult = 1.0
        if schedule is not None:
            index = max(schedule.phase_index(clock), phase_index or 0)
            phase = schedule.phases[index]
            info = {"phase": phase.name, **schedule.plan_rope(index, facts.model_config)}
            if index != phase_index:
                if phase_index is not None:
                    events.append({"event": "phase", "batch": b, "tokens": clock.tokens, "phase": phase.name,
                                   "seq_len": phase.seq_length, "positions": info["positions"],
                                   "lr_multiplier": phase.lr_multiplier})
                phase_index = index
        # the loader's rows and row length: the Trainer's batches, or the phase dataset's loader
        rows, length = (schedule.plan_batch(phase_index) if schedule is not None else None) or (gbs, full)
        token_len = length
        for alg in lengths:
            new = alg.plan_length(clock, length)
            if new < length and alg.truncates:  # reshape keeps every token, truncate the head
                token_len = token_len * new // length
            length = new
        for _, alg in suite:
            mult *= alg.plan_lr(clock, records[id(alg)])
        tokens = rows * token_len  # what the run counts: the tokens trained (a truncated tail is not)
        fpt = flops(length)
        row = {"batch": b, "tokens": clock.tokens, "seq_len": length, "tokens_per_step": tokens, **info,
               "lr_multiplier": round(mult, 6),
               **{k: shape[k] for k in ("layers", "mlp_width", "params")}, "flops_per_token": fpt}
        same = segments and all(segments[-1][k] == row[k] for k in row if k not in ("batch", "tokens", "batches"))
        if same:
            segments[-1]["batches"] += 1
        else:
            segments.append({**row, "batches": 1})
        total += tokens * fpt
        clock.batch += 1
        clock.tokens += tokens
        clock.samples += rows  # Composer counts the loader's rows, before any cut
        # BATCH_END: growth, LoRA and orchestrator timeouts, in list order
        for _, alg in suite:
            before, fpt_before = dict(shape), flops(length)
            fired = alg.plan_events(clock, clock.batch, model, records[id(alg)])
            if not fired:
                continue
            shape = _shape(model)
            change = {k: [before[k], shape[k]] for k in ("layers", "mlp_width", "params")}
            events.extend({**e, "tokens": clock.tokens, **change, "flops_per_token": [fpt_before, flops(length)],
                           "trainable": shape["trainable"]} for e in fired)
    for _, alg in suite:
        events.extend({**e, "tokens": None} for e in alg.plan_pending(records[id(alg)], clock.batch))
    # the comparisons: the same run without the suite's algorithms, on the model as built (the
    # starting architecture) and on the final one, trained from scratch at the data's full length
    baseline_tokens = gbs * full * clock.batch
    baseline = baseline_tokens * _flops_per_token(meta_model(facts.model_config), full)
    final = baseline_tokens * _flops_per_token(model, full)
    return {
        "source": facts.source,
        "max_duration": str(md),
        "batches": clock.batch,
        "tokens": clock.tokens,
        "global_batch": gbs,
        "data_seq_len": full,
        "algorithms": [n for n, _ in algorithms],
        "final_params": shape["params"],
        "segments": segments,
        "events": events,
        "training_flops": total,
        "baseline_flops": baseline,
        "baseline_tokens": baseline_tokens,
        "flops_ratio": total / baseline if baseline else None,
        "final_arch_flops": final,
        "final_arch_flops_ratio": total / final if final else None,
    }


def plan_file(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The plan of a recipe, or of an llm-foundry train YAML that names our algorithms."""
    from composer_growth.recipe import load_recipe, validate

    data = load_recipe(path, overrides)
    if is_foundry(data):
        facts, algs = foundry_run(data)
    else:
        plan = validate(data)
        facts, algs = facts_from_recipe(plan), list(zip(plan.algorithm_labels, plan.algorithms))
    return plan_run(facts, algs)


# --------------------------------------------------------------------------- output


def _when(seg: dict[str, Any]) -> str:
    return f"batch {seg['batch']:>7,}  tok {seg['tokens']:>14,}"


def format_plan(result: dict[str, Any]) -> str:
    lines = [f"plan: {result['source'] or 'run'}  max_duration {result['max_duration']}  "
             f"({result['batches']:,} batches, {result['tokens']:,} tokens, global batch {result['global_batch']}, "
             f"data {result['data_seq_len']} tokens/row)",
             f"algorithms: {', '.join(result['algorithms']) or 'none'}", "", "timeline:"]
    for seg in result["segments"]:
        rope = ""
        if "phase" in seg:
            factor = seg.get("rope_factor")
            rope = f"  phase {seg['phase']}  {seg['positions']}" + (
                f" (factor {factor:g})" if factor is not None and seg.get("rope_type") not in (None, "alibi") else "")
        lines.append(f"  {_when(seg)}  x{seg['batches']:<6} seq {seg['seq_len']:>6}  tok/step {seg['tokens_per_step']:,}"
                     f"{rope}  layers {seg['layers']}  "
                     f"mlp {seg['mlp_width']}  params {seg['params']:,}  {seg['flops_per_token']:.3g} FLOPs/tok  "
                     f"lr x{seg['lr_multiplier']:g}")
    lines += ["", "events:"]
    for e in result["events"]:
        head = (f"  batch {e['batch']:>7,}  tok {e['tokens']:>14,}  " if e["batch"] is not None and e["tokens"] is not None
                else " " * 37)
        if e["event"] == "phase":
            lines.append(head + f"phase {e['phase']}: seq {e['seq_len']}, {e['positions']}, lr x{e['lr_multiplier']:g}")
        elif e["event"] in ("stack_layers", "widen_mlp") and "layers" not in e:  # waits on a plateau
            lines.append(head + f"{e['event']}: {e['text']}")
        elif e["event"] in ("stack_layers", "widen_mlp"):
            lines.append(head + f"{e['event']}: layers {e['layers'][0]} -> {e['layers'][1]}, mlp {e['mlp_width'][0]} -> "
                         f"{e['mlp_width'][1]}, params {e['params'][0]:,} -> {e['params'][1]:,}, FLOPs/tok "
                         f"{e['flops_per_token'][0]:.3g} -> {e['flops_per_token'][1]:.3g}"
                         + (f"; {e['text']}" if "text" in e else ""))
        elif e["event"] == "lora_start":
            lines.append(head + f"lora adapters on (rank {e['rank']}): trainable {e['trainable']:,} of {e['params'][1]:,}")
        elif e["event"] == "orchestrator":
            lines.append(head + f"orchestrator {e['op']}: {e['text']}")
        elif e["event"] == "lora_merge":
            lines.append(head + f"lora merge {e['merge']} (adapters restart)")
        elif e["event"] == "seq_length_warmup":
            lines.append(head + f"seq_length_warmup over: {e['text']}")
        else:
            lines.append(head + json.dumps(e))
    if not result["events"]:
        lines.append("  none")
    ratio, final = result["flops_ratio"], result["final_arch_flops_ratio"]
    lines += ["", f"final parameter count: {result['final_params']:,}"]
    if ratio is None:
        lines.append("training FLOPs: 0")
    else:
        lines += [f"training FLOPs: {result['training_flops']:.4g}, against the same run without the suite's "
                  f"algorithms ({result['baseline_tokens']:,} tokens at the data's length):",
                  f"  on the starting model   {result['baseline_flops']:.4g}  (ratio {ratio:.3f})",
                  f"  on the final model      {result['final_arch_flops']:.4g}  (ratio {final:.3f}; the real "
                  "alternative to growth: the final architecture from scratch)"]
    return "\n".join(lines)


def draw_plan(result: dict[str, Any], path: str) -> str | None:
    """The plan's curves over the run as a PNG; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install matplotlib)"
    segs = result["segments"]
    xs = [s["batch"] for s in segs] + [result["batches"]]

    def steps(key):
        return [s[key] for s in segs] + [segs[-1][key]]

    panels = [("seq_len", "sequence length"), ("layers", "layers"), ("mlp_width", "MLP width"),
              ("params", "parameters"), ("flops_per_token", "FLOPs / token"), ("lr_multiplier", "LR multiplier")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.0 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels):
        ax.step(xs, steps(key), where="post")
        ax.set_ylabel(label, fontsize=8)
        for e in result["events"]:
            if e["batch"] is not None:
                ax.axvline(e["batch"], color="grey", lw=0.6, ls="--")
    for e in (e for e in result["events"] if e["batch"] is not None):
        axes[0].annotate(e.get("phase", e["event"]), (e["batch"], axes[0].get_ylim()[1]), fontsize=7,
                         rotation=90, va="top", ha="right")
    axes[-1].set_xlabel("batch")
    fig.suptitle(f"composer-growth plan: {result['source'] or 'run'} (FLOPs x{result['flops_ratio']:.2f} of the "
                 f"starting model, x{result['final_arch_flops_ratio']:.2f} of the final model trained from scratch)"
                 if result["flops_ratio"] else "composer-growth plan", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def write_plan(result: dict[str, Any], json_path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isinf(x) else str(x))
