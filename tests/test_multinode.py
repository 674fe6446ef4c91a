"""Two nodes of one rank each, simulated on loopback: data per node or shared, and what stops a run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from conftest import launch_nodes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
PREPARE = {"source": "python-source", "seq_len": 32, "vocab_size": 512, "max_bytes": 600_000, "val_percent": 10}

pytestmark = pytest.mark.skipif(subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0,
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


def test_separate_data_folders_node_without_data_builds_its_own(tiny_recipe, tiny_data, tmp_path):
    recipe = _small(tiny_recipe)
    recipe["data"] = {"path": "./data", "prepare": PREPARE}  # node-local: relative to each node's folder
    nodes, path = _nodes(tmp_path, recipe)
    shutil.copytree(tiny_data, nodes[0] / "data")  # node 0 has it, node 1 has not
    procs = launch_nodes(TRAIN, [path], nodes)
    assert [p.returncode for p in procs] == [0, 0], [p.err[-3000:] for p in procs]
    assert (nodes[1] / "data" / "manifest.json").exists()
    assert "training a 512-token" not in _logs(procs[0]) and "training a 512-token" in _logs(procs[1])


def test_shared_data_folder_is_built_once(tiny_recipe, tmp_path):
    recipe = _small(tiny_recipe)
    recipe["data"] = {"path": str(tmp_path / "shared-data"), "prepare": PREPARE}
    nodes, path = _nodes(tmp_path, recipe)
    procs = launch_nodes(TRAIN, [path], nodes)
    assert [p.returncode for p in procs] == [0, 0], [p.err[-3000:] for p in procs]
    logs = _logs(procs[0]) + _logs(procs[1])
    assert logs.count("training a 512-token") == 1  # one node built it, under the lock
    assert logs.count("reusing dataset") == 1       # the other found it built


@pytest.mark.parametrize("case", ["data_without_prepare", "local_save_folder_with_autoresume"])
def test_what_stops_every_rank_with_one_line(tiny_recipe, tiny_data, tmp_path, case):
    recipe = _small(tiny_recipe)
    if case == "data_without_prepare":
        recipe["data"] = {"path": "./data"}
        expected = "composer-growth: error: data.path='./data': no dataset there on node 1"
    else:
        recipe.update(save_folder="./ckpt", autoresume=True)
        expected = "composer-growth: error: save_folder='./ckpt': autoresume on 2 nodes needs a folder all nodes share"
    nodes, path = _nodes(tmp_path, recipe)
    if case == "data_without_prepare":
        shutil.copytree(tiny_data, nodes[0] / "data")
    procs = launch_nodes(TRAIN, [path], nodes, timeout=300)
    for proc in procs:
        assert proc.returncode != 0
        assert expected in _logs(proc), _logs(proc)[-3000:]
