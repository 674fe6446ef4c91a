"""``benchmarks/gpu.sh``, the one GPU command, through its CPU dry run (the same steps: fp32, gloo, tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import _own_shm, own_shm_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ("warmup", "growth", "lora", "orchestrator", "context")
STEPS = ("install", "data", "smoke", *(f"smoke {s}" for s in SMOKE), "bench warmup", "bench growth", "bench combined")


def _load_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_report", os.path.join(ROOT, "benchmarks", "gpu_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_report = _load_report()


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The rows of the last table the script printed: step -> [result, seconds, key figures]."""
    lines = stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| step | result | seconds |"))
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start + 2:]]
    assert all(line.startswith("|") for line in lines[start:]), "the table is not the last thing printed"
    return {c[0]: c[1:] for c in cells}


@pytest.mark.launcher
def test_dry_run_passes_every_step_and_prints_the_table_last(tmp_path):
    """Every step of the GPU script, on the CPU: the smoke runs each algorithm under the Composer launcher
    at world size 1 with FSDP2 over gloo, and each does what its recipe asks; the three benchmarks write
    their figures; the table comes last with a row per step."""
    out = tmp_path / "out"
    env = dict(os.environ, GPU_SH_DRY_RUN="1", OUT=str(out), GPU_SH_WORK=str(tmp_path / "work"),
               PYTHON=sys.executable, PYTHONPATH=ROOT)
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")]
    if own_shm_available():  # StreamingDataset's shared-memory names cannot meet other processes'
        cmd = _own_shm(cmd)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    logs = proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = table_rows(proc.stdout)
    assert tuple(rows) == STEPS, logs
    assert rows["install"][0] == "skipped", logs
    failed = {k: v for k, v in rows.items() if k != "install" and v[0] != "pass"}
    assert not failed, f"{failed}\n{logs}"
    assert proc.returncode == 0, logs
    assert all(float(rows[s][1]) > 0 for s in STEPS[1:]), rows

    smoke = {e["step"]: e for e in json.loads((out / "smoke.json").read_text())}
    for name in SMOKE:
        e = smoke[f"smoke {name}"]
        assert (e["device"], e["precision"], e["attention"]) == ("cpu", "fp32", "sdpa"), e
        assert (e["fsdp"], e["backend"], e["world_size"]) == (True, "gloo", 1), e
        assert e["batches"] == e["max_batches"] == 8 and e["events"], e
    assert [v["name"] for v in smoke["smoke growth"]["events"]] == ["stack_layers", "widen_mlp"]
    assert smoke["smoke growth"]["params_end"] > smoke["smoke growth"]["params_start"]
    assert sum(v["name"] == "lora_merge" for v in smoke["smoke lora"]["events"]) >= 2
    assert smoke["smoke orchestrator"]["params_end"] > smoke["smoke orchestrator"]["params_start"]
    results = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in results["rows"]] == list(STEPS)
    assert "speedup" in rows["bench warmup"][2] and "surgery: stack" in rows["bench growth"][2]
    assert results["details"]["bench combined"]["combined"]["flops"] < results["details"]["bench combined"]["baseline"]["flops"]
    assert (out / "table.md").read_text().strip().endswith(proc.stdout.rstrip().splitlines()[-1])
    assert (out / "logs.tar.gz").stat().st_size > 0


def test_report_fails_a_step_that_broke_and_keeps_the_others(tmp_path):
    """The table of a run whose smoke process died after one recipe and whose growth benchmark failed:
    the missing recipes and the benchmark fail, with why; the rest keep their rows; the status is 1."""
    (tmp_path / "steps.tsv").write_text(
        "install\tpass\t10.0\t\n"
        "smoke\tfail\t30.0\trc=1: RuntimeError: boom\n"
        "bench growth\tfail\t5.0\trc=1: Traceback\n"
        "bench combined\ttimeout\t95.0\tstopped at its 95 s limit\n")
    entry = {"step": "smoke warmup", "result": "pass", "seconds": 3.0, "problems": [], "batches": 8, "loss": 7.0,
             "device": "cuda", "precision": "amp_bf16", "attention": "sdpa", "fsdp": True, "backend": "nccl",
             "world_size": 1, "peak_alloc_gib": 0.1, "params_start": 10, "params_end": 10,
             "events": [{"batch": 4, "name": "seq_length_warmup"}]}
    (tmp_path / "smoke.json").write_text(json.dumps([entry]))
    assert gpu_report.main([str(tmp_path), "--smoke", "warmup,growth"]) == 1
    rows, _ = gpu_report.build_rows(str(tmp_path), ["warmup", "growth"])
    got = {r["step"]: (r["result"], r["figures"]) for r in rows}
    assert list(got) == ["install", "smoke", "smoke warmup", "smoke growth", "bench growth", "bench combined"]
    assert got["smoke warmup"][0] == "pass" and "nccl" in got["smoke warmup"][1]
    assert got["smoke growth"] == ("fail", "no result: the smoke process ended first (fail)")
    assert got["bench growth"][0] == "fail" and "no results in bench-growth.json" in got["bench growth"][1]
    assert got["bench combined"][0] == "timeout"
    assert (tmp_path / "table.md").read_text().count("\n| ") == 1 + len(rows)
