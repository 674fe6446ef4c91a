"""Checkpoints in an S3 object store (moto's S3 server on 127.0.0.1): runs killed with SIGKILL right after
a growth or a LoRA merge resume from the store, sharded (FSDP2) and full, exactly as if uninterrupted."""

from __future__ import annotations

import os

import pytest
import yaml

from conftest import launch, launch_failure, read_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "store_runs.py")


@pytest.fixture
def s3_store(monkeypatch):
    """An S3 bucket on a moto server of this test's own; the environment points Composer's S3ObjectStore
    (and the launched ranks) at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckpt")
    yield "s3://ckpt"
    server.stop()


def _store_runs(recipes: dict, steps: list[str], store: str, workdir) -> None:
    """One launch of ``store_runs.py`` that runs ``steps`` (its logs in a folder named after the last one);
    every step, a kill included, must have recorded its result."""
    path = workdir / "recipes.yaml"
    path.write_text(yaml.safe_dump(recipes))
    logs = workdir / steps[-1]
    logs.mkdir()
    proc = launch(SCRIPT, [str(path), str(workdir / "p{rank}.json"), store, *steps], logs, own_shm=True)
    assert (proc.returncode != 0) == steps[-1].endswith(".kill"), launch_failure(proc, logs)
    for rank in (0, 1):
        assert set(steps) <= set(read_summary(workdir / f"p{rank}.json")), launch_failure(proc, logs)


def _event_batches(result: dict) -> list[int]:
    """The batches of the growth, or of every merge, that the run's algorithm recorded."""
    state = result["replayed"][0]
    return [h["batch"] for h in state["history"]] if "history" in state else [state["batch"]]


ALGORITHMS = {
    "growth": {"algorithms": {"stack_layers": {"at": "2ba", "mode": "repeat", "times": 2,
                                               "init": "function_preserving"}}},
    "lora": {"algorithms": {"lora_merge": {"interval": "2ba", "restart_warmup": "1ba", "prune": "magnitude",
                                           "ratio": 0.9}},
             "peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
}
#: recipe.checkpoint kind: FSDP2 sharded, and full checkpoints under DDP and FSDP2
RUNS = ["growth.sharded", "growth.ddp", "lora.sharded", "lora.full"]


@pytest.mark.launcher
def test_killed_after_growth_or_merge_resumes_from_the_store(tiny_recipe, tmp_path, s3_store, monkeypatch):
    """Each run of RUNS saves to the store every 2 batches; the growth (or first merge) happens at batch 2,
    the run is killed (SIGKILL) in batch 3, once the store holds the batch-2 checkpoint; the restart, with
    nothing of it on disk, finds that checkpoint through autoresume, replays the growth or merge before the
    weights load, and trains batches 3..8 exactly as the uninterrupted run did (losses and final
    parameters). Restarted once more from the same working folder (2 batches longer), the DDP run finds the
    store's latest checkpoint (batch 8), not the copy of batch 2 that its resume downloaded there."""
    # StreamingDataset picks its shared-memory prefix past every prefix with a file lock in the temp folder;
    # each rank looks for itself, so other processes' locks coming and going in a shared /tmp could make
    # the two ranks pick different prefixes
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    recipes = {}
    for name, extra in ALGORITHMS.items():
        recipe = dict(tiny_recipe, save_interval="2ba", eval_interval="8ba", eval_first=False,
                      algorithms=extra["algorithms"])
        if "peft" in extra:
            recipe["model"] = dict(recipe["model"], peft=extra["peft"])
        recipes[name] = recipe
    # every kill ends its launch: the next launch resumes that run, then starts the next one and kills it
    launches = [RUNS + [f"{RUNS[0]}.kill"],
                ["growth.sharded.resume", "growth.ddp.kill"],
                ["growth.ddp.resume", "growth.ddp.restart", "lora.sharded.kill"],
                ["lora.sharded.resume", "lora.full.kill"],
                ["lora.full.resume"]]
    for steps in launches:
        _store_runs(recipes, steps, s3_store, tmp_path)
    for rank in (0, 1):
        results = read_summary(tmp_path / f"p{rank}.json")
        for run_ in RUNS:
            name, kind = run_.split(".")
            full, killed, resumed = results[run_], results[f"{run_}.kill"], results[f"{run_}.resume"]
            assert (killed["checkpoint"], killed["killed"]) == (2, 3), run_
            ckpt = f"{name}-{kind}/ep0-ba2" + ("" if kind == "sharded" else "-rank0.pt")
            assert killed["symlink"] == (ckpt if rank == 0 else None), run_
            assert resumed["start"] == 2, run_
            if kind == "sharded":  # read from the store
                assert resumed["load_path"] == f"{s3_store}/{ckpt}", run_
            else:  # downloaded from the store into the run's working folder
                assert resumed["load_path"] == str(tmp_path / "cwd" / run_ / f"s3:/ckpt/{name}-{kind}/latest-rank0.pt")
            assert resumed["layers"] == full["layers"] == (4 if name == "growth" else 2), run_
            assert _event_batches(resumed) == _event_batches(full) and _event_batches(full)[0] == 2, run_
            assert sorted(resumed["losses"], key=int) == [str(b) for b in range(3, 9)], run_
            assert [resumed["losses"][b] for b in resumed["losses"]] == pytest.approx(
                [full["losses"][b] for b in resumed["losses"]], rel=1e-6, abs=1e-6), run_
            assert resumed["params"].keys() == full["params"].keys(), run_
            assert resumed["params"] == pytest.approx(full["params"], rel=1e-6, abs=1e-6), run_
        restarted = results["growth.ddp.restart"]
        assert restarted["start"] == 8 and sorted(map(int, restarted["losses"])) == [9, 10]
        assert restarted["load_path"] == results["growth.ddp.resume"]["load_path"]
