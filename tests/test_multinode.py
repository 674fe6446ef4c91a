"""Two nodes of one rank each, simulated on loopback: data per node or shared, and what stops a run."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from conftest import launch_nodes, own_shm_available, read_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
PREPARE = {"source": "python-source", "seq_len": 32, "vocab_size": 512, "max_bytes": 600_000, "val_percent": 10}

pytestmark = pytest.mark.skipif(not own_shm_available(),
                                reason="needs unshare --mount (root) for a /dev/shm per simulated node")


def _nodes(tmp_path, recipe):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return nodes, str(path)


def _logs(proc) -> str:
    return proc.out + proc.err


def _small(recipe):
    recipe.update(max_duration="2ba", eval_first=False, eval_interval="2ba", save_folder=None, summary_file=None)
    return recipe


@pytest.mark.launcher
def test_shared_data_folder_is_built_once(tiny_recipe, tmp_path):
    recipe = _small(tiny_recipe)
    recipe["data"] = {"path": str(tmp_path / "shared-data"), "prepare": PREPARE}
    nodes, path = _nodes(tmp_path, recipe)
    procs = launch_nodes(TRAIN, [path], nodes)
    assert [p.returncode for p in procs] == [0, 0], [p.err[-3000:] for p in procs]
    logs = _logs(procs[0]) + _logs(procs[1])
    assert logs.count("training a 512-token") == 1  # one node built it, under the lock
    assert logs.count("reusing dataset") == 1       # the other found it built


@pytest.mark.launcher
def test_node_without_data_and_without_prepare_stops_every_rank(tiny_recipe, tiny_data, tmp_path):
    recipe = _small(tiny_recipe)
    recipe["data"] = {"path": "./data"}  # node-local: relative to each node's folder
    nodes, path = _nodes(tmp_path, recipe)
    shutil.copytree(tiny_data, nodes[0] / "data")  # node 0 has it, node 1 has not
    procs = launch_nodes(TRAIN, [path], nodes, timeout=300)
    for proc in procs:
        assert proc.returncode != 0
        assert "composer-growth: error: data.path='./data': no dataset there on node 1 (no manifest.json)" in _logs(proc)


@pytest.mark.launcher
def test_separate_data_folders_then_a_local_save_folder_with_autoresume(tiny_recipe, tiny_data, tmp_path):
    """Node 1 lacks the data and builds its own copy (node 0 keeps its own); then, before training,
    autoresume into a save folder each node holds alone stops every rank."""
    recipe = _small(tiny_recipe)
    recipe["data"] = {"path": "./data", "prepare": PREPARE}
    recipe.update(save_folder="./ckpt", autoresume=True)
    nodes, path = _nodes(tmp_path, recipe)
    shutil.copytree(tiny_data, nodes[0] / "data")
    procs = launch_nodes(TRAIN, [path], nodes, timeout=300)
    assert (nodes[1] / "data" / "manifest.json").exists()
    assert "training a 512-token" not in _logs(procs[0]) and "training a 512-token" in _logs(procs[1])
    for proc in procs:
        assert proc.returncode != 0
        assert ("composer-growth: error: save_folder='./ckpt': autoresume on 2 nodes needs a folder all nodes "
                "share (or a remote URI)") in _logs(proc), _logs(proc)[-3000:]


def _fsdp_runs_on_two_nodes(tmp_path, recipe: dict, resume: str) -> list[tuple[dict, dict, dict]]:
    """``tests/scripts/fsdp_runs.py`` on two nodes of one rank each: ``recipe`` under DDP, under FSDP2, and
    under FSDP2 resumed from the sharded checkpoint ``resume``. Each rank's (ddp, sharded, resumed) results."""
    import json

    nodes, path = _nodes(tmp_path, recipe)
    runs = ["ddp", "sharded", resume]
    procs = launch_nodes(os.path.join(ROOT, "tests", "scripts", "fsdp_runs.py"),
                         [path, str(tmp_path / "p{rank}.json"), *runs], nodes)
    assert [p.returncode for p in procs] == [0, 0], [p.err[-3000:] for p in procs]
    results = [json.loads((tmp_path / f"p{rank}.json").read_text()) for rank in (0, 1)]
    return [tuple(r[name] for name in runs) for r in results]


@pytest.mark.launcher
def test_growth_under_fsdp2_on_two_nodes_matches_ddp_and_resumes(tiny_recipe, tmp_path):
    """Two nodes of one rank each, a shared folder for checkpoints: G_stack at batch 3 under FSDP2
    trains what DDP trains, and a run resumed from the sharded checkpoint after it goes on exactly."""
    tiny_recipe["algorithms"] = {"stack_layers": {"at": "3ba", "times": 2}}
    tiny_recipe.update(max_duration="6ba", eval_first=False, eval_interval="6ba", save_interval="4ba",
                       summary_file=None)
    for ddp, fsdp, resumed in _fsdp_runs_on_two_nodes(tmp_path, tiny_recipe, "sharded@ep0-ba4"):
        assert fsdp["fsdp"] and fsdp["units"] == resumed["units"] == 4 + 1 and resumed["layers"] == 4
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
        assert resumed["losses"] == pytest.approx(fsdp["losses"][4:], abs=1e-6)
        assert resumed["params"] == pytest.approx(fsdp["params"], rel=1e-6, abs=1e-6)


@pytest.mark.launcher
def test_every_algorithm_on_two_nodes_under_fsdp2_matches_ddp_and_resumes(tiny_recipe, tmp_path):
    """Two nodes of one rank each, FSDP2 with sharded checkpoints against DDP, on a peft model: the warmup
    inside a context schedule whose second phase trains on its own dataset (built on first use, once, by
    the first node), ReLoRA merges, and orchestrator ops (G_stack and a LoRA alpha change, by timeout).
    Both train the same losses and lengths, and a run resumed from the sharded checkpoint after the growth
    and a merge goes on exactly."""
    tiny_recipe["model"]["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    long_data = str(tmp_path / "data32")
    tiny_recipe["algorithms"] = {
        "seq_length_warmup": {"min_seq_length": 8, "max_seq_length": 16, "step_size": 8, "duration": "2ba"},
        "context_length_schedule": {"phases": [
            {"name": "short", "seq_length": 16, "duration": "0.5dur"},
            {"name": "long", "seq_length": 32, "dataset": long_data,
             "prepare": {"max_bytes": 200_000, "val_percent": 10}}],
            "save_checkpoints": False, "export_hf": False, "eval_batches": 0, "verbose": False},
        "lora_merge": {"interval": "3ba", "prune": "magnitude", "ratio": 0.5},
        "orchestrator": {"verbose": False, "schedule": [
            {"name": "stack_layers", "value": 2, "trigger_loss": None, "max_wait_iters": 2},
            {"name": "change_lora_alpha", "value": 2.0, "trigger_loss": None, "max_wait_iters": 3}]},  # 3 after the first
    }
    tiny_recipe.update(max_duration="8ba", eval_first=False, eval_interval="8ba", save_interval="5ba",
                       summary_file=None)
    per_rank = _fsdp_runs_on_two_nodes(tmp_path, tiny_recipe, "sharded@ep0-ba5")
    assert (tmp_path / "data32" / "manifest.json").exists()
    for ddp, fsdp, resumed in per_rank:
        assert fsdp["fsdp"] and not ddp["fsdp"] and fsdp["layers"] == resumed["layers"] == 4
        assert fsdp["lengths"] == ddp["lengths"] == [8, 8, 16, 16, 32, 32, 32, 32]
        assert resumed["lengths"] == fsdp["lengths"][5:]
        merges = next(s for s in fsdp["replayed"] if "merges" in s)
        fired = next(s for s in fsdp["replayed"] if "fired" in s)["fired"]
        assert merges["merges"] == 2 and [(f["batch"], f["status"]) for f in fired] == [(2, "applied"), (5, "applied")]
        assert fsdp["shapes"] == ddp["shapes"] == resumed["shapes"]
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
        assert fsdp["params"] == pytest.approx(ddp["params"], rel=1e-3, abs=1e-3)
        assert resumed["losses"] == pytest.approx(fsdp["losses"][5:], abs=1e-6)
        assert resumed["params"] == pytest.approx(fsdp["params"], rel=1e-6, abs=1e-6)


@pytest.mark.launcher
def test_shipped_multinode_fsdp2_recipe_cpu_sized_grows_and_autoresumes(tiny_recipe, tmp_path):
    """yamls/gstack_1b_fsdp2_multinode.yaml at CPU size on two loopback nodes (its parallelism, algorithms,
    optimizer and autoresume as shipped; model, data and lengths made tiny): it grows at 25% and writes
    sharded checkpoints to the shared folder; the same command with a longer max_duration resumes from
    the last one, with the grown model, and finishes."""
    with open(os.path.join(ROOT, "yamls", "gstack_1b_fsdp2_multinode.yaml")) as f:
        recipe = yaml.safe_load(f)
    assert recipe["parallelism"]["fsdp"]["version"] == 2 and recipe["autoresume"] is True
    recipe["model"]["config"] = dict(tiny_recipe["model"]["config"], num_hidden_layers=2)
    shared = tmp_path / "shared"
    recipe.update(data=tiny_recipe["data"], precision="fp32", global_train_batch_size=8,
                  device_train_microbatch_size=4, device_eval_batch_size=8, max_duration="4ba",
                  eval_interval="4ba", eval_subset_num_batches=1, save_interval="2ba",
                  save_folder=str(shared / "ckpt"), summary_file=str(shared / "summary.json"), callbacks={})
    recipe["parallelism"]["fsdp"].pop("mixed_precision")
    nodes, path = _nodes(tmp_path, recipe)
    procs = launch_nodes(TRAIN, [path], nodes)
    assert [p.returncode for p in procs] == [0, 0], [p.err[-3000:] for p in procs]
    first = read_summary(shared / "summary.json")
    assert [e["text"].split(",")[0] for e in first["events"] if e["name"] == "stack_layers"] == ["layers 2 -> 4"]
    assert (shared / "ckpt" / "ep0-ba4").is_dir()  # sharded: a folder per checkpoint
    procs = launch_nodes(TRAIN, [path, "max_duration=6ba"], nodes)
    assert [p.returncode for p in procs] == [0, 0], [p.err[-3000:] for p in procs]
    second = read_summary(shared / "summary.json")
    assert second["batches"] == 6 and second["final_params"] == first["final_params"]
