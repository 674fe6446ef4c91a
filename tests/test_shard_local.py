"""Growth under FSDP2 on each rank's own shards against the growth on gathered tensors (``composer -n 2``)."""

from __future__ import annotations

import pytest
import torch

from conftest import fsdp_runs


def _recipe(recipe):
    """Four stacks (explicit copy, repeat function-preserving, append random, prepend copy with the trunk
    frozen) and a noisy widening, with sharded checkpoints every 3 batches."""
    recipe["algorithms"] = {
        "stack_layers": [
            {"at": "2ba", "mode": "explicit", "source_layers": [0, 1, 1]},  # 2 -> 3 layers
            {"at": "3ba", "mode": "repeat", "times": 2, "init": "function_preserving"},  # 6
            {"at": "5ba", "mode": "append", "num_new": 1, "init": "random", "seed": 3},  # 7
            {"at": "6ba", "mode": "prepend", "num_new": 1, "trunk": "frozen"},  # 8, the last 7 frozen
        ],
        "widen_mlp": {"at": "4ba", "factor": 1.5, "noise_std": 0.01},  # 64 -> 96
    }
    recipe.update(max_duration="8ba", eval_first=False, eval_interval="8ba", save_interval="3ba")
    return recipe


def _growths(run):
    return [s for s in run["replayed"] if "path" in s]


@pytest.mark.launcher
def test_shard_local_growth_matches_gathered_and_resumes(tiny_recipe, tmp_path):
    """Under composer -n 2: every growth on the ranks' own shards ends with the model, the optimizer
    moments and the per-batch losses of the same growths on gathered tensors; a sharded resume after the
    first two growths and one after all five (replayed shard-locally) go on exactly."""
    runs = ["gathered", "sharded", "sharded@ep0-ba3", "sharded@ep0-ba6"]
    results = fsdp_runs(_recipe(tiny_recipe), runs, tmp_path)
    for rank in (0, 1):
        gathered, local = results[rank]["gathered"], results[rank]["sharded"]
        assert [g["path"] for g in _growths(gathered)] == ["gathered"] * 5
        assert [g["path"] for g in _growths(local)] == ["shard-local"] * 5
        assert local["layers"] == 8 and local["units"] == 8 + 1  # one FSDP unit per block, and the root
        assert local["shapes"] == gathered["shapes"]
        assert gathered["state_storage"] == local["state_storage"] == 1.0  # each rank holds its shards only
        assert gathered["frozen_with_grad"] == local["frozen_with_grad"] == 0  # the frozen trunk drops its grads
        assert local["losses"] == pytest.approx(gathered["losses"], abs=1e-6)
        for name in ("sharded@ep0-ba3", "sharded@ep0-ba6"):
            resumed = results[rank][name]
            assert resumed["layers"] == 8 and resumed["units"] == 9
            assert resumed["losses"] == pytest.approx(local["losses"][-len(resumed["losses"]):], abs=1e-6)
            assert resumed["params"] == pytest.approx(local["params"], rel=1e-6, abs=1e-6)
        assert len(results[rank]["sharded@ep0-ba3"]["losses"]) == 5
    ref, new = torch.load(tmp_path / "gathered.pt"), torch.load(tmp_path / "sharded.pt")
    assert ref["params"].keys() == new["params"].keys()
    frozen = [name for name in ref["params"] if not ref["state"][name]]
    assert any(".layers.7." in name for name in frozen)  # the trunk frozen by the last stack holds no moments
    for name, value in ref["params"].items():
        torch.testing.assert_close(new["params"][name], value, rtol=0, atol=1e-6, msg=name)
        assert new["state"][name].keys() == ref["state"][name].keys(), name
        for key, moment in ref["state"][name].items():
            torch.testing.assert_close(new["state"][name][key], moment, rtol=0, atol=1e-6, msg=f"{name} {key}")
    for name in ("sharded@ep0-ba3", "sharded@ep0-ba6"):
        resumed = torch.load(tmp_path / f"{name}.pt")
        for param, moments in new["state"].items():
            for key, moment in moments.items():
                torch.testing.assert_close(resumed["state"][param][key], moment, rtol=0, atol=1e-6)


def test_bad_fsdp_growth_path_fails_before_training(tiny_recipe, monkeypatch):
    from composer_growth.errors import ConfigError
    from composer_growth.recipe import validate

    monkeypatch.setenv("COMPOSER_GROWTH_FSDP_PATH", "local")
    tiny_recipe["algorithms"] = {"widen_mlp": {"at": "4ba"}}
    tiny_recipe["parallelism"] = {"fsdp": {"version": 2}}
    with pytest.raises(ConfigError) as err:
        validate(tiny_recipe)
    assert str(err.value) == "COMPOSER_GROWTH_FSDP_PATH='local': one of shard-local, gathered"
    monkeypatch.setenv("COMPOSER_GROWTH_FSDP_PATH", "gathered")
    validate(tiny_recipe)
