"""The recipe path end to end: YAML -> validation -> a real Composer Trainer on real MDS shards."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import yaml

from composer_growth.errors import ConfigError
from composer_growth.recipe import load_recipe, run, validate
from composer_growth.unwrap import unwrap_hf

from conftest import launch, launch_failure, read_summary, resume_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recipe_trains_evaluates_and_saves(tiny_recipe, tmp_path):
    trainer = run(validate(tiny_recipe))
    info = read_summary(tiny_recipe["summary_file"])
    assert info["batches"] == 8
    assert info["tokens_trained"] == 8 * 8 * 32
    # an eval before the first step, then at 4ba and 8ba
    assert [e["batch"] for e in info["evals"]] == [0, 4, 8]
    assert all(math.isfinite(e["loss"]) for e in info["evals"])
    assert info["last_eval_loss"] < info["first_eval_loss"]
    assert os.path.exists(os.path.join(tiny_recipe["save_folder"], "ep0-ba8-rank0.pt"))
    assert trainer.state.model.model.config.num_hidden_layers == 2


def test_yaml_overrides_and_interpolation(tiny_recipe, tmp_path):
    path = tmp_path / "r.yaml"
    tiny_recipe["summary_file"] = "${save_folder}/s.json"
    path.write_text(yaml.safe_dump(tiny_recipe))
    data = load_recipe(str(path), ["max_duration=3ba", "optimizer.lr=0.01"])
    assert data["max_duration"] == "3ba"
    assert data["optimizer"]["lr"] == 0.01
    assert data["summary_file"] == f"{tiny_recipe['save_folder']}/s.json"


def test_resume_matches_uninterrupted_run(tiny_recipe, tmp_path):
    run(validate(tiny_recipe))
    uninterrupted = read_summary(tiny_recipe["summary_file"])
    _, after = resume_from(tiny_recipe, "ep0-ba4-rank0.pt", tmp_path)
    assert after["batches"] == 8
    assert after["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in uninterrupted["evals"]], rel=1e-5)


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r.update(max_duraton="8ba"), "max_duraton"),
    (lambda r: r.update(global_train_batch_size="eight"), "global_train_batch_size"),
    (lambda r: r["optimizer"].update(lr="fast"), "optimizer.lr"),
    (lambda r: r.update(algorithms={"no_such_algorithm": {}}), "algorithms.no_such_algorithm"),
    (lambda r: r.update(callbacks={"nope": {}}), "callbacks.nope"),
    (lambda r: r.update(data={"path": "/nonexistent/dataset"}), "data.path"),
    (lambda r: r["data"].update(eval_split="test"), "data.eval_split"),
    (lambda r: r.update(device_train_microbatch_size=3), "device_train_microbatch_size"),
    (lambda r: r["model"].update(family="bert_like"), "model.family"),
    (lambda r: r["model"]["config"].update(hiden_size=8), "model.config.hiden_size"),
    (lambda r: r.update(precision="fp12"), "precision"),
    (lambda r: r.update(max_duration="soon"), "max_duration"),
    (lambda r: r.update(scheduler={"name": "cosine_with_warmup", "t_warmup": "3weeks"}), "scheduler.t_warmup"),
    (lambda r: r.update(parallelism={"pipeline": {}}), "parallelism.pipeline"),
    (lambda r: r.update(autoresume=True, run_name=None), "autoresume"),
    (lambda r: r.update(parallelism={"fsdp": {"version": 3}}), "parallelism.fsdp.version"),
    (lambda r: r.update(parallelism={"fsdp": {"version": 2, "sharding_strategy": "FULL_SHARD"}}),
     "parallelism.fsdp.sharding_strategy"),
    (lambda r: r.update(parallelism={"fsdp": {"version": 2, "state_dict_type": "local"}}),
     "parallelism.fsdp.state_dict_type"),
    (lambda r: r.update(parallelism={"fsdp": {"version": 2}}, device_train_microbatch_size="auto"),
     "device_train_microbatch_size"),
    (lambda r: r.update(parallelism={"fsdp": "yes"}), "parallelism.fsdp"),
])
def test_validation_names_the_key(tiny_recipe, mutate, key):
    mutate(tiny_recipe)
    with pytest.raises(ConfigError) as err:
        validate(tiny_recipe)
    msg = str(err.value)
    assert msg.startswith(f"{key}="), msg
    assert "\n" not in msg


def test_fsdp_version_2_builds_an_fsdp2_config(tiny_recipe, monkeypatch):
    from composer.utils.parallelism import FSDP2Config

    from composer_growth.recipe.build import parallelism_config

    monkeypatch.setenv("FSDP_VERSION", "1")  # the recipe decides, not the environment
    tiny_recipe["parallelism"] = {"fsdp": {"version": 2, "state_dict_type": "full", "reshard_after_forward": False}}
    built = parallelism_config(validate(tiny_recipe).recipe)["fsdp"]
    assert isinstance(built, FSDP2Config)
    assert built.state_dict_type == "full" and built.reshard_after_forward is False


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="FSDP1 is allowed where CUDA is")
@pytest.mark.parametrize("fsdp", [{}, {"version": 1, "sharding_strategy": "FULL_SHARD"}])
def test_fsdp1_without_cuda_fails_at_validation(tiny_recipe, fsdp):
    tiny_recipe["parallelism"] = {"fsdp": fsdp}
    with pytest.raises(ConfigError, match=r"^parallelism.fsdp.version=1: FSDP1 needs CUDA and this machine has none; "
                                          r"set parallelism.fsdp.version: 2"):
        validate(tiny_recipe)


def test_model_blocks_are_the_fsdp_units(tiny_recipe):
    from composer_growth.recipe.build import build_model, build_tokenizer

    recipe = validate(tiny_recipe).recipe
    model = build_model(recipe, build_tokenizer(recipe))
    hf = unwrap_hf(model)
    units = [name for name, m in hf.named_modules() if hf.fsdp_wrap_fn(m)]
    assert units == ["model.layers.0", "model.layers.1"]
    assert [name for name, m in hf.named_modules() if hf.activation_checkpointing_fn(m)] == units


def test_missing_data_on_several_ranks_is_decided_after_dist_starts(tiny_recipe, tmp_path):
    """One process stops at validation; several defer to ensure_data, where every rank learns which
    nodes lack the data and all stop together (tests/test_multinode.py)."""
    tiny_recipe["data"] = {"path": str(tmp_path / "absent")}
    with pytest.raises(ConfigError, match=r"^data.path=.*no dataset there \(no manifest.json\)"):
        validate(tiny_recipe, world_size=1)
    validate(tiny_recipe, world_size=2)


def test_batch_size_must_divide_world_size(tiny_recipe):
    tiny_recipe["global_train_batch_size"] = 6
    tiny_recipe["device_train_microbatch_size"] = 3
    validate(tiny_recipe, world_size=2)
    with pytest.raises(ConfigError, match=r"^global_train_batch_size=6: must divide by the world size \(4\)"):
        validate(tiny_recipe, world_size=4)


@pytest.mark.launcher
def test_cli_rejects_bad_recipe_in_one_line(tiny_recipe, tmp_path):
    tiny_recipe["optimizer"]["name"] = "lion"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    proc = subprocess.run([sys.executable, "-m", "composer_growth.cli", "train", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("composer-growth: error: optimizer.name='lion': one of"), proc.stderr
    assert not os.path.exists(tiny_recipe["save_folder"])  # nothing was trained


def test_shipped_recipes_validate(tiny_data, tmp_path):
    for name in sorted(os.listdir(os.path.join(ROOT, "yamls"))):
        path = os.path.join(ROOT, "yamls", name)
        if not os.path.isfile(path):
            continue  # yamls/foundry/: llm-foundry's train YAMLs, run in tests/test_llmfoundry_home.py
        # a recipe that builds its own data validates against the data it will build
        builds = "prepare" in (load_recipe(path).get("data") or {})
        data = load_recipe(path, [f"data.path={tmp_path / 'absent' if builds else tiny_data}"])
        validate(data)


@pytest.mark.launcher
def test_composer_launcher_two_ranks_agree(tiny_recipe, tmp_path):
    tiny_recipe["summary_file"] = str(tmp_path / "summary-{rank}.json")
    tiny_recipe["eval_first"] = False
    tiny_recipe["max_duration"] = "4ba"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    proc = launch(os.path.join(ROOT, "scripts", "train.py"), [str(path)], tmp_path)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    r0, r1 = read_summary(tmp_path / "summary-0.json"), read_summary(tmp_path / "summary-1.json")
    assert r0["batches"] == r1["batches"] == 4
    assert r0["tokens_trained"] == 4 * 8 * 32  # the global batch, split over two ranks
    assert r0["last_eval_loss"] == r1["last_eval_loss"]
    assert r0["train_loss"] == r1["train_loss"]
