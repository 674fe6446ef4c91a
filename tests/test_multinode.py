"""Two nodes of one rank each, simulated on loopback: data per node or shared, and what stops a run."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from conftest import launch_nodes, own_shm_available

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


@pytest.mark.launcher
def test_growth_under_fsdp2_on_two_nodes_matches_ddp_and_resumes(tiny_recipe, tmp_path):
    """Two nodes of one rank each, a shared folder for checkpoints: G_stack at batch 3 under FSDP2
    trains what DDP trains, and a run resumed from the sharded checkpoint after it goes on exactly."""
    import json

    tiny_recipe["algorithms"] = {"stack_layers": {"at": "3ba", "times": 2}}
    tiny_recipe.update(max_duration="6ba", eval_first=False, eval_interval="6ba", save_interval="4ba",
                       summary_file=None)
    nodes, path = _nodes(tmp_path, tiny_recipe)
    runs = ["ddp", "sharded", "sharded@ep0-ba4"]
    procs = launch_nodes(os.path.join(ROOT, "tests", "scripts", "fsdp_runs.py"),
                         [path, str(tmp_path / "p{rank}.json"), *runs], nodes)
    assert [p.returncode for p in procs] == [0, 0], [p.err[-3000:] for p in procs]
    for rank in (0, 1):
        results = json.loads((tmp_path / f"p{rank}.json").read_text())
        ddp, fsdp, resumed = (results[r] for r in runs)
        assert fsdp["fsdp"] and fsdp["units"] == resumed["units"] == 4 + 1 and resumed["layers"] == 4
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
        assert resumed["losses"] == pytest.approx(fsdp["losses"][4:], abs=1e-6)
        assert resumed["params"] == pytest.approx(fsdp["params"], rel=1e-6, abs=1e-6)
