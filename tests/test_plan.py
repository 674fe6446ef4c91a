"""``composer-growth plan``: every shipped recipe plans; the plan of a shortened quickstart is what the run does."""

from __future__ import annotations

import glob
import json
import os

import pytest
import yaml
from composer.core import Callback
from composer.loggers import InMemoryLogger

from composer_growth.cli import main
from composer_growth.errors import ConfigError
from composer_growth.plan import plan_file
from composer_growth.unwrap import unwrap_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "yamls", "*.yaml")))
FOUNDRY = sorted(glob.glob(os.path.join(ROOT, "yamls", "foundry", "*.yaml")))


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.foundry) if "mpt" in os.path.basename(p) else p
                                  for p in RECIPES + FOUNDRY], ids=os.path.basename)
def test_every_recipe_plans(path, tmp_path):
    if "mpt" in os.path.basename(path):
        pytest.importorskip("llmfoundry")
    out = tmp_path / "plan"
    assert main(["plan", path, "--out", str(out), "--no-png"]) == 0
    result = json.loads((out / "plan.json").read_text())
    assert result["batches"] > 0 and result["segments"][0]["batch"] == 0
    assert sum(s["batches"] for s in result["segments"]) == result["batches"]
    assert result["training_flops"] > 0 and result["baseline_flops"] > 0


def _short_quickstart(tiny_data: str, tmp_path) -> str:
    """The quickstart, shortened to 8 batches of a tiny model on the 32-token fixture data."""
    with open(os.path.join(ROOT, "yamls", "quickstart.yaml")) as f:
        recipe = yaml.safe_load(f)
    recipe["data"] = {"path": tiny_data}
    recipe["model"]["config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                     num_key_value_heads=2, max_position_embeddings=16)
    algs = recipe["algorithms"]
    algs["context_length_schedule"].update(
        eval_batches=0, save_checkpoints=False, export_hf=False,
        phases=[{"name": "ctx16", "seq_length": 16, "duration": "0.5dur"},
                {"name": "ctx32", "seq_length": 32, "duration": "0.5dur",
                 "rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
    algs["seq_length_warmup"].update(min_seq_length=8, max_seq_length=16, step_size=8, duration="0.25dur",
                                     preallocate=False)
    algs["stack_layers"]["at"] = "0.25dur"
    algs["widen_mlp"]["at"] = "0.625dur"
    recipe.update(global_train_batch_size=4, device_train_microbatch_size=4, device_eval_batch_size=8,
                  max_duration="8ba", eval_interval="8ba", eval_first=False, eval_subset_num_batches=1,
                  save_folder=None, save_interval="100ba", progress_bar=False,
                  summary_file=str(tmp_path / "summary.json"))
    recipe.pop("callbacks", None)
    path = tmp_path / "quickstart_short.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


class BatchLengths(Callback):
    """The sequence length each training batch trains at (``BATCH_START``: after the algorithms cut it)."""

    def __init__(self):
        self.lengths: list[int] = []

    def batch_start(self, state, logger) -> None:
        self.lengths.append(int(state.batch["input_ids"].shape[1]))


def test_plan_matches_the_run(tiny_data, tmp_path, one_thread, capsys):
    from composer_growth.recipe import load_recipe, run, validate

    path = _short_quickstart(tiny_data, tmp_path)
    out = tmp_path / "plan"
    assert main(["plan", path, "--out", str(out)]) == 0
    planned = json.loads((out / "plan.json").read_text())
    assert (out / "plan.png").stat().st_size > 0

    plan = validate(load_recipe(path))
    memory = InMemoryLogger()
    plan.loggers.append(memory)
    seen = BatchLengths()
    plan.callbacks.append(seen)
    trainer = run(plan)

    # lengths batch by batch: what each batch trained at, after every algorithm cut it
    lengths = [s["seq_len"] for s in planned["segments"] for _ in range(s["batches"])]
    assert seen.lengths == lengths == [8, 8, 16, 16, 32, 32, 32, 32]
    # phase changes: the schedule logs context/prev_seq_len only at a transition, before the batch
    changes = [int(ts.batch) for ts, _ in memory.data["context/prev_seq_len"]]
    assert changes == [e["batch"] for e in planned["events"] if e["event"] == "phase"] == [4]

    # growth: when, layers and parameters
    growth = {e["event"]: e for e in planned["events"] if e["event"] in ("stack_layers", "widen_mlp")}
    by_name = dict(zip(plan.recipe.algorithms, plan.algorithms))
    for name in ("stack_layers", "widen_mlp"):
        record = by_name[name].record
        assert record["batch"] == growth[name]["batch"], name
        assert [record["params_before"], record["params_after"]] == growth[name]["params"], name
    assert sorted((e["batch"], e["event"]) for e in planned["events"]) == [
        (2, "seq_length_warmup"), (2, "stack_layers"), (4, "phase"), (5, "widen_mlp")]
    hf = unwrap_hf(trainer.state.model)
    assert hf.config.num_hidden_layers == growth["stack_layers"]["layers"][1] == 4
    assert hf.config.intermediate_size == growth["widen_mlp"]["mlp_width"][1] == 128
    assert sum(p.numel() for p in hf.parameters()) == planned["final_params"]
    assert int(trainer.state.timestamp.token) == planned["tokens"]
    # growth's real alternative: the final architecture from scratch, on the plain run's tokens
    from composer_growth.functional.flops import training_flops_per_token
    final = planned["baseline_tokens"] * int(training_flops_per_token(hf.config, planned["data_seq_len"]))
    assert planned["final_arch_flops"] == final > planned["baseline_flops"]
    assert planned["final_arch_flops_ratio"] == pytest.approx(planned["training_flops"] / final)

    # every event printed once when it happened, and listed in the summary with the final parameter count
    out = capsys.readouterr().out
    assert out.count("] stack_layers: layers 2 -> 4, MLP width 64 -> 64") == 1
    assert out.count("] widen_mlp: layers 4 -> 4, MLP width 64 -> 128") == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted((e["batch"], e["name"]) for e in summary["events"]) == [
        (2, "seq_length_warmup"), (2, "stack_layers"), (4, "context_length_schedule"), (5, "widen_mlp")]
    assert "loss" in next(e["text"] for e in summary["events"] if e["name"] == "stack_layers")
    assert summary["final_params"] == planned["final_params"]


def test_plan_walks_only_the_suite_interface(tiny_data, tmp_path):
    """Every registered algorithm implements the suite's interface; plan skips Composer's own ones."""
    from composer_growth.algorithms.base import SuiteAlgorithm
    from composer_growth.recipe.build import load_all
    from composer_growth.registry import ALGORITHMS

    load_all()
    ours = {n: c for n, c in ALGORITHMS.items() if c.__module__.startswith("composer_growth")}
    assert len(ours) == 6 and all(issubclass(c, SuiteAlgorithm) for c in ours.values())
    path = _short_quickstart(tiny_data, tmp_path)
    with open(path) as f:
        recipe = yaml.safe_load(f)
    recipe["algorithms"]["gradient_clipping"] = {"clipping_type": "norm", "clipping_threshold": 1.0}
    clipped = tmp_path / "clipped.yaml"
    clipped.write_text(yaml.safe_dump(recipe))
    plain, with_clipping = plan_file(path), plan_file(str(clipped))
    assert with_clipping["events"] == plain["events"] and len(plain["events"]) == 4


def test_plan_rejects_a_bad_recipe(tiny_data, tmp_path):
    path = _short_quickstart(tiny_data, tmp_path)
    with pytest.raises(ConfigError, match="stack_layers.at"):
        plan_file(path, ["algorithms.stack_layers.at=9ba"])


class StepTokens(Callback):
    """The tokens the run counts for each batch (``BATCH_END``: after the schedule took off what it cut)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.last = 0

    def batch_end(self, state, logger) -> None:
        now = int(state.timestamp.token)
        self.tokens.append(now - self.last)
        self.last = now


def _context_extension_cpu(tiny_data: str, tmp_path, mode: str = "reshape") -> str:
    """The context-extension recipe on the CPU: a tiny llama, max_duration in tokens and phases as shares of
    them, each phase on its own small dataset (built on first use from its prepare block) with its own tokens
    per step: 512 (tokens_per_step: 8 rows of 64 cut to 32 x 16), then 4 x 32 and 3 x 64 rows
    (global_batch_size)."""
    with open(os.path.join(ROOT, "yamls", "context_extension_llama.yaml")) as f:
        recipe = yaml.safe_load(f)
    recipe["data"] = {"path": tiny_data}
    recipe["model"]["config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    data64, data64b = str(tmp_path / "ctx64"), str(tmp_path / "ctx64b")
    build = {"source": "python-source", "seq_len": 64, "max_bytes": 150_000, "val_percent": 10}
    recipe["algorithms"]["context_length_schedule"].update(
        tokens_per_step=512, mode=mode, eval_batches=0, save_checkpoints=False, export_hf=False, verbose=False, phases=[
            {"name": "ctx16", "seq_length": 16, "duration": "0.5dur", "dataset": data64, "prepare": build},
            {"name": "ctx32", "seq_length": 32, "duration": "0.25dur", "dataset": data64, "global_batch_size": 4},
            {"name": "ctx64", "seq_length": 64, "duration": "0.25dur", "dataset": data64b, "prepare": build,
             "global_batch_size": 3, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
    recipe.update(global_train_batch_size=8, device_train_microbatch_size=8, device_eval_batch_size=8,
                  max_duration="8192tok", eval_interval="1000ba", eval_first=False, eval_subset_num_batches=1,
                  save_folder=None, save_interval="1000ba", progress_bar=False,
                  summary_file=str(tmp_path / "summary.json"))
    recipe.pop("callbacks", None)
    path = tmp_path / "context_extension_cpu.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


# (seq_len, tokens per step) of each phase, phase-change batches, batches, tokens: reshape keeps every token
# (4096 tokens at 512 a step, 2048 at 4 x 32, the last 2048 at 3 x 64: the run ends at the batch reaching
# 8192); truncate trains each loader row's head (8 rows of 16, 2 of 32, 3 of 64)
OWN_DATA = {"reshape": ([(16, 512), (32, 128), (64, 192)], [8, 24], 35, 8256),
            "truncate": ([(16, 128), (32, 64), (64, 192)], [32, 64], 75, 8256)}


@pytest.mark.parametrize("mode", sorted(OWN_DATA))
def test_plan_matches_a_run_whose_phases_bring_their_own_data(mode, tiny_data, tmp_path, one_thread):
    """Phase datasets with their own rows per step: plan's batches, tokens per step, phase changes and total
    are the run's (phases measured in tokens end on the tokens each phase's batches hold)."""
    from composer_growth.algorithms.context_schedule import ContextLengthSchedule
    from composer_growth.recipe import load_recipe, run, validate

    path = _context_extension_cpu(tiny_data, tmp_path, mode)
    planned = plan_file(path)  # before the phase datasets exist: their lengths from the prepare blocks
    per_batch = [s["tokens_per_step"] for s in planned["segments"] for _ in range(s["batches"])]
    changes = [e["batch"] for e in planned["events"] if e["event"] == "phase"]
    steps, expected_changes, batches, tokens = OWN_DATA[mode]
    assert [(s["seq_len"], s["tokens_per_step"]) for s in planned["segments"]] == steps
    assert (changes, planned["batches"], planned["tokens"]) == (expected_changes, batches, tokens)

    plan = validate(load_recipe(path))
    seen = StepTokens()
    plan.callbacks.append(seen)
    trainer = run(plan)
    schedule = next(a for a in plan.algorithms if isinstance(a, ContextLengthSchedule))
    assert [e["batch"] for e in schedule.run_events()] == changes
    assert int(trainer.state.timestamp.batch) == planned["batches"]
    assert seen.tokens == per_batch
    assert int(trainer.state.timestamp.token) == planned["tokens"]


@pytest.mark.parametrize("n, tokens, billions", [(8e9, 15e12, 6.58), (7e9, 2e12, 11.11), (13e9, 2e12, 15.84),
                                                 (70e9, 2e12, 42.48)])
def test_gstack_timing_reproduces_the_published_llama_table(n, tokens, billions):
    """The table of the G_stack authors' README (Llama3-8B, Llama2-7B/13B/70B), with C = 6 N D."""
    from composer_growth.suggest import growth_timing

    assert growth_timing(n, 6 * n * tokens) / 1e9 == pytest.approx(billions, abs=0.006)


def test_plan_suggest_prints_the_gstack_guideline_next_to_the_recipe(tiny_recipe, tmp_path, capsys):
    import math

    tiny_recipe.update(max_duration="16ba")
    tiny_recipe["algorithms"] = {"stack_layers": {"at": "4ba", "times": 2}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    out = tmp_path / "plan"
    assert main(["plan", str(path), "--out", str(out), "--no-png", "--suggest"]) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "plan.json").read_text())
    n, tokens = result["final_params"], result["tokens"]
    flops = 6 * n * tokens
    d = 10 ** (0.88 * math.log10(n) + 163.27 / math.log10(flops) - 5.74)
    assert f"N = {n:,} parameters (the final model), C = 6 N D = {flops:.4g} FLOPs (D = {tokens:,} tokens)" in text
    assert f"growth timing d: {d:.4g} tokens (past the end of the run" in text  # a tiny model: far past 16 batches
    assert "recipe: stack_layers at batch 4 (1,024 tokens), layers 2 -> 4 (g = 2)" in text
    assert "growth factor g = 4: layers 1 -> 4" in text
    assert "log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74, growth factor g = 4" in text
    assert result["suggest"]["d_tokens"] == pytest.approx(d)


def test_suggested_batch_counts_the_run_s_tokens():
    from composer_growth.suggest import _batch_at

    result = {"tokens": 1000, "segments": [{"batch": 0, "tokens": 0, "batches": 4},  # 50 tokens a batch
                                           {"batch": 4, "tokens": 200, "batches": 8}]}  # 100 a batch
    assert [_batch_at(result, t) for t in (1, 50, 51, 200, 201, 1000, 1001)] == [1, 1, 2, 4, 5, 12, None]
