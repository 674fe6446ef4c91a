"""Faults a real run meets, and what survives each: a kill -9 at every kind of event, a checkpoint cut
short, a half-built dataset, a damaged index, a full disk, and bad input. Every user error ends in one
line; a damaged checkpoint or dataset costs only the work since the last good one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from composer.core import Callback

from composer_growth.errors import ConfigError, DataError
from composer_growth.recipe import load_recipe, run, validate
from composer_growth.recipe.checkpoints import CheckpointError, list_checkpoints

from conftest import own_shm_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "fault_run.py")

pytestmark = pytest.mark.usefixtures("one_thread")


class Losses(Callback):
    """Each batch's training loss, by batch number."""

    def __init__(self):
        self.by_batch: dict[int, float] = {}

    def batch_end(self, state, logger):
        self.by_batch[int(state.timestamp.batch)] = float(state.loss.detach())


def _train(recipe: dict):
    plan = validate(recipe)
    losses = Losses()
    plan.callbacks.append(losses)
    trainer = run(plan)
    return trainer, losses.by_batch


def _cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "composer_growth.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _last_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def _truncate(path: str, keep: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


# -- checkpoints --------------------------------------------------------------------------------------------


def test_truncated_newest_checkpoint_resumes_from_the_older_one(tiny_recipe, tmp_path, capfd):
    _, uninterrupted = _train(dict(tiny_recipe))
    folder = tmp_path / "restart"
    folder.mkdir()
    for name in ("ep0-ba4-rank0.pt", "ep0-ba8-rank0.pt"):
        shutil.copy(os.path.join(tiny_recipe["save_folder"], name), folder)
    _truncate(str(folder / "ep0-ba8-rank0.pt"))  # a full disk or a preempted copy
    os.symlink("ep0-ba8-rank0.pt", folder / "latest-rank0.pt")
    capfd.readouterr()

    trainer, resumed = _train(dict(tiny_recipe, save_folder=str(folder), autoresume=True))
    lines = [line for line in capfd.readouterr().err.splitlines() if "checkpoint" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"composer-growth: checkpoint {folder / 'ep0-ba8-rank0.pt'} is unreadable (")
    assert lines[0].endswith("set aside as ep0-ba8-rank0.pt.damaged; resuming from ep0-ba4-rank0.pt")
    assert trainer.state.load_path == str(folder / "ep0-ba4-rank0.pt")
    # 4 batches lost; the 4 retrained ones are the uninterrupted run's
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[b] for b in resumed] == pytest.approx([uninterrupted[b] for b in resumed], rel=1e-6)
    # nothing deleted: the damaged file kept aside, a fresh ba8 written
    assert (folder / "ep0-ba8-rank0.pt.damaged").exists()
    assert [c.batch for c in list_checkpoints(str(folder))] == [8, 4]


def test_no_readable_checkpoint_stops_in_one_line(tiny_recipe, tmp_path):
    folder = tmp_path / "only-damaged"
    folder.mkdir()
    (folder / "ep0-ba4-rank0.pt").write_bytes(b"PK\x03\x04 cut short")
    tiny_recipe.update(save_folder=str(folder), autoresume=True)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    proc = _cli("train", str(path))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len([line for line in lines if "composer-growth" in line]) == 1
    assert lines[-1] == (
        f"composer-growth: error: save_folder {folder}: no readable checkpoint to resume from (ep0-ba4-rank0.pt: "
        "not a complete torch zip archive (14 bytes: File is not a zip file)); move them away to start afresh, "
        "or set autoresume: false")
    assert os.listdir(folder) == ["ep0-ba4-rank0.pt"]  # nothing deleted, nothing renamed
    with pytest.raises(CheckpointError):
        _train(tiny_recipe)


def test_checkpoints_to_keep_holds_across_restarts(tiny_recipe, tmp_path):
    tiny_recipe.update(save_interval="2ba", save_num_checkpoints_to_keep=1, autoresume=True, eval_interval="8ba")
    folder = tiny_recipe["save_folder"]
    for end in (4, 6, 8):  # a run and two restarts
        _train(dict(tiny_recipe, max_duration=f"{end}ba"))
        assert [c.batch for c in list_checkpoints(folder)] == [end]


# -- datasets ----------------------------------------------------------------------------------------------


def test_failed_dataset_build_leaves_no_dataset(tmp_path):
    from composer_growth.data import prepare_dataset
    from composer_growth.data.prepare import read_manifest

    out = tmp_path / "ds"
    # sequences longer than the validation split holds: the build fails after writing the train split
    with pytest.raises(ConfigError, match=r"^max_bytes=200000: too small: split 'val' holds no full sequence"):
        prepare_dataset(str(out), seq_len=20_000, vocab_size=300, max_bytes=200_000, val_percent=10)
    assert not out.exists() and not (tmp_path / "ds.building").exists()
    assert read_manifest(str(out)) is None
    # a killed build's leftovers are never read as data, and the next build clears them
    (tmp_path / "ds.building" / "train").mkdir(parents=True)
    (tmp_path / "ds.building" / "train" / "index.json").write_text("{}")
    manifest = prepare_dataset(str(out), seq_len=16, vocab_size=300, max_bytes=200_000, val_percent=10)
    assert manifest["splits"]["val"]["sequences"] > 0
    assert sorted(os.listdir(out)) == ["manifest.json", "tokenizer", "train", "val"]
    assert not (tmp_path / "ds.building").exists()


def test_corrupt_index_is_one_line_in_validate_and_train(tiny_recipe, tiny_data, tmp_path):
    from composer_growth.data.loaders import build_lm_dataloader

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "val" / "index.json").write_text('{"version": 2, "shards": [')
    tiny_recipe["data"] = {"path": str(data)}
    with pytest.raises(ConfigError, match=r"^data.path=.*split val: .*val/index.json is unreadable"):
        validate(tiny_recipe)
    with pytest.raises(DataError, match=r"split val: .*index.json is unreadable"):
        build_lm_dataloader(str(data), "val", 4)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    proc = _cli("validate", str(path))
    assert proc.returncode == 2
    assert _last_line(proc).startswith(f"composer-growth: error: data.path='{data}': split val: {data}/val/index.json "
                                       "is unreadable (")
    # a shard cut short is found as well
    shutil.copy(os.path.join(tiny_data, "val", "index.json"), data / "val" / "index.json")
    shard = sorted(p for p in os.listdir(data / "val") if p.endswith(".mds"))[0]
    _truncate(str(data / "val" / shard))
    with pytest.raises(ConfigError, match=rf"{shard} holds \d+ bytes, index.json lists \d+"):
        validate(tiny_recipe)


# -- bad input, in one line ----------------------------------------------------------------------------------


def test_yaml_syntax_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run_name: x\nmodel: {family: llama\nmax_duration: 4ba\n")
    proc = _cli("validate", str(path))
    assert proc.returncode == 2
    assert _last_line(proc) == (f"composer-growth: error: recipe='{path}:3:13': YAML syntax error: "
                                "did not find expected ',' or '}'")
    proc = _cli("validate", str(path), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("overrides, line", [
    (["max_duration=4ba", "oops"], "override='oops': expected key=value"),
    (["eval_interval=0ba"], "eval_interval='0ba': a positive time"),
    (["model.peft={r: 0}"], "model.peft.r=0: an integer >= 1"),
    (["algorithms.orchestrator.schedule=missing.yaml"], "algorithms.orchestrator.schedule='missing.yaml': no such file"),
    (["algorithms.orchestrator.schedule.3.max_wait_iters=1"],
     "algorithms.orchestrator.schedule.3.max_wait_iters='1': algorithms.orchestrator.schedule is a list of 1 "
     "entries: index it with 0..0"),
    (["save_folder=FILE/ckpt"], "save_folder='FILE/ckpt': FILE is a file, not a folder"),
])
def test_bad_input_names_the_key_the_user_wrote(tiny_recipe, tmp_path, overrides, line):
    tiny_recipe["algorithms"] = {"orchestrator": {"schedule": [
        {"name": "change_lr", "value": 0.5, "trigger_loss": None, "max_wait_iters": 3, "reevaluate": False}]}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    (tmp_path / "FILE").write_text("a file")
    overrides = [o.replace("FILE", str(tmp_path / "FILE")) for o in overrides]
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(str(path), overrides))
    assert str(err.value).startswith(line.replace("FILE", str(tmp_path / "FILE"))), str(err.value)


def test_list_index_override_changes_an_orchestrator_entry(tiny_recipe, tmp_path):
    tiny_recipe["algorithms"] = {"orchestrator": {"schedule": [
        {"name": "change_lr", "value": 0.5, "trigger_loss": None, "max_wait_iters": 3, "reevaluate": False}]}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    for key in ("algorithms.orchestrator.schedule.0.max_wait_iters", "algorithms.orchestrator.schedule[0].max_wait_iters"):
        data = load_recipe(str(path), [f"{key}=12", "optimizer.lr=0.01"])
        assert data["algorithms"]["orchestrator"]["schedule"][0]["max_wait_iters"] == 12
        assert data["algorithms"]["orchestrator"]["schedule"][0]["name"] == "change_lr"
        assert data["optimizer"]["lr"] == 0.01
        validate(data)


# -- kill -9 at each kind of event, then resume ------------------------------------------------------------

EVENTS = {
    "growth": {"algorithms": {"stack_layers": {"at": "3ba", "mode": "repeat", "times": 2,
                                               "init": "function_preserving"}}},
    "phase_change": {"algorithms": {"context_length_schedule": {"phases": [
        {"name": "short", "seq_length": 16, "duration": "0.375dur"}, {"name": "long", "seq_length": 32}]}}},
    "lora_merge": {"algorithms": {"lora_merge": {"interval": "3ba", "restart_warmup": "2ba", "prune": "magnitude",
                                                 "ratio": 0.9}},
                   "model": {"peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}},
    "orchestrator_op": {"algorithms": {"orchestrator": {"schedule": [
        {"name": "change_lr", "value": 0.5, "trigger_loss": None, "max_wait_iters": 3, "reevaluate": False}]}}},
}


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _fault_run(recipe: dict, log, kill: str, workdir) -> subprocess.CompletedProcess:
    path = workdir / f"{os.path.basename(str(log))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return subprocess.run([sys.executable, SCRIPT, str(log), kill, str(path)], capture_output=True, text=True,
                          timeout=600, cwd=str(workdir))


@pytest.mark.launcher
@pytest.mark.parametrize("kind", sorted(EVENTS))
def test_kill_at_an_event_then_resume_matches_uninterrupted(tiny_recipe, tmp_path, kind):
    extra = EVENTS[kind]
    recipe = dict(tiny_recipe, save_interval="2ba", eval_interval="2ba", algorithms=extra["algorithms"])
    if "model" in extra:
        recipe["model"] = dict(recipe["model"], **extra["model"])
    full = _fault_run(dict(recipe, save_folder=str(tmp_path / "full")), tmp_path / "full.log", "none", tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    killed_recipe = dict(recipe, save_folder=str(tmp_path / "killed"), autoresume=True)
    killed = _fault_run(killed_recipe, tmp_path / "killed.log", "event", tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    kill = next(r for r in _records(tmp_path / "killed.log") if "killed" in r)
    # the event happened in that batch (a phase change is recorded at the batch before the new phase's first)
    assert kill["events"] and kill["killed"] - max(kill["events"]) in (0, 1)
    resumed = _fault_run(killed_recipe, tmp_path / "resumed.log", "none", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    start = next(r for r in _records(tmp_path / "resumed.log") if "start" in r)
    last_saved = kill["killed"] - kill["killed"] % 2  # the checkpoint before the kill survives
    if last_saved == kill["killed"]:
        last_saved -= 2
    assert start["start"] == last_saved
    assert start["load_path"].endswith(f"ep0-ba{last_saved}-rank0.pt")
    expected = {r["batch"]: r["loss"] for r in _records(tmp_path / "full.log") if "loss" in r}
    got = {r["batch"]: r["loss"] for r in _records(tmp_path / "resumed.log") if "loss" in r}
    assert sorted(got) == list(range(last_saved + 1, 9))  # lost: the batches after the last checkpoint
    assert [got[b] for b in sorted(got)] == pytest.approx([expected[b] for b in sorted(got)], rel=1e-5, abs=1e-6)


@pytest.mark.launcher
@pytest.mark.skipif(not own_shm_available(), reason="needs `unshare --mount` and `mount -t tmpfs` (root)")
def test_full_disk_then_resume_from_the_last_good_checkpoint(tiny_recipe, tmp_path):
    """Checkpoints go to a tmpfs that holds two of them: the third save fails with one line, its file is
    cut short; with room again, the restart sets it aside and resumes from the last good one."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = _fault_run(dict(tiny_recipe, max_duration="2ba", save_interval="2ba", save_folder=str(tmp_path / "probe")),
                       tmp_path / "probe.log", "none", tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    size = os.path.getsize(tmp_path / "probe" / "ep0-ba2-rank0.pt")
    recipe = dict(tiny_recipe, save_interval="2ba", save_folder=str(mnt / "ckpt"), autoresume=True,
                  summary_file=None)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train = f"{shlex_join([sys.executable, SCRIPT])} {{log}} none {path}"
    shell = (f"mount -t tmpfs -o size={int(size * 2.5)} tmpfs {mnt} && "
             f"{train.format(log=tmp_path / 'full-disk.log')}; echo rc=$? >&2; "
             f"mount -o remount,size={size * 10} {mnt} && {train.format(log=tmp_path / 'resumed.log')}; "
             f"echo rc=$? >&2; ls {mnt / 'ckpt'} >&2")
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", shell], capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    first, second = (line for line in err.splitlines() if line.startswith("rc="))
    assert first == "rc=1" and second == "rc=0", err[-3000:]
    full = [line for line in err.splitlines() if line.startswith("composer-growth: error: ")]
    assert len(full) == 1 and "No space left on device" in full[0], err[-3000:]
    damaged = [line for line in err.splitlines() if "is unreadable" in line]
    assert len(damaged) == 1 and "ep0-ba6-rank0.pt" in damaged[0] and "resuming from ep0-ba4-rank0.pt" in damaged[0]
    start = next(r for r in _records(tmp_path / "resumed.log") if "start" in r)
    assert start["start"] == 4  # lost: the 2 batches after the last good checkpoint
    assert sorted(r["batch"] for r in _records(tmp_path / "resumed.log") if "loss" in r) == [5, 6, 7, 8]


def shlex_join(parts: list[str]) -> str:
    import shlex

    return shlex.join(parts)


@pytest.mark.launcher
def test_sharded_checkpoint_with_one_damaged_rank_file_falls_back(tiny_recipe, tmp_path):
    """Two ranks under FSDP2 (sharded checkpoints): rank 1's shard of the newest checkpoint is cut short;
    both ranks agree to resume from the older one and continue exactly as the uninterrupted run."""
    from conftest import fsdp_runs

    tiny_recipe.update(save_interval="2ba", max_duration="6ba", eval_interval="6ba")
    for results in fsdp_runs(tiny_recipe, ["sharded", "sharded@ep0-ba2~ep0-ba4"], tmp_path):
        full, resumed = results["sharded"], results["sharded@ep0-ba2~ep0-ba4"]
        assert len(resumed["losses"]) == 4  # batches 3..6: the damaged checkpoint's 2 batches retrained
        assert resumed["losses"] == pytest.approx(full["losses"][2:], abs=1e-6)
    # rank 0 set the damaged checkpoint aside (nothing deleted) and the resumed run saved a fresh one
    folder = tmp_path / "sharded@ep0-ba2~ep0-ba4"
    assert (folder / "ep0-ba4.damaged" / "__1_0.distcp").exists()
    assert [c.batch for c in list_checkpoints(str(folder))] == [6, 4, 2]
