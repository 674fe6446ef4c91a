"""Shared fixtures: one tiny real dataset per session, and a tiny recipe over it."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = {
    "family": "llama",
    "config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 64,
    },
}


@pytest.fixture
def one_thread():
    """Tiny matmuls run about 10x faster on one thread than with two threads fighting over 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """MDS shards of 32-token sequences of this machine's Python source, with a 512-token BPE."""
    from composer_growth.data import prepare_dataset

    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_dataset(out, source="python-source", seq_len=32, vocab_size=512, max_bytes=600_000, val_percent=10)
    return out


@pytest.fixture
def tiny_recipe(tiny_data, tmp_path) -> dict:
    return copy.deepcopy({
        "run_name": "tiny",
        "seed": 7,
        "data": {"path": tiny_data},
        "model": TINY_MODEL,
        "optimizer": {"name": "decoupled_adamw", "lr": 3e-3},
        "scheduler": {"name": "cosine_with_warmup", "t_warmup": "2ba", "alpha_f": 0.1},
        "global_train_batch_size": 8,
        "device_train_microbatch_size": 4,
        "device_eval_batch_size": 16,
        "max_duration": "8ba",
        "eval_interval": "4ba",
        "eval_subset_num_batches": 2,
        "progress_bar": False,
        "save_folder": str(tmp_path / "ckpt"),
        "save_interval": "4ba",
        "save_num_checkpoints_to_keep": -1,
        "summary_file": str(tmp_path / "summary.json"),
    })


def own_shm_available() -> bool:
    """Whether a process can get a /dev/shm of its own here (``unshare --mount``, as root)."""
    import subprocess

    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


_CURRENT: dict[str, object] = {}


@pytest.fixture(autouse=True)
def _current_test(request):
    """Keeps the running test's node, so the launch helpers can insist it is marked ``launcher``."""
    _CURRENT["node"] = request.node
    yield
    _CURRENT.pop("node", None)
    _end_abandoned_streaming_epochs()


def _end_abandoned_streaming_epochs() -> None:
    """A StreamingDataset iterated only part way (a run that stops mid-epoch, an eval subset) keeps two
    threads polling every 7 ms until its next epoch starts; a test's datasets never start another, and
    hundreds of such threads over a session starve the interpreter. End their epochs once the test is over."""
    from composer_growth.algorithms.composer_hooks import release_finished_trainers
    from composer_growth.data.loaders import end_open_epochs, release_shared_memory

    end_open_epochs()
    release_finished_trainers()  # else every test's State stays, with its datasets
    release_shared_memory()  # else their shared memory stays open: past the open-file limit in a session


def _require_launcher_mark() -> None:
    node = _CURRENT.get("node")
    if node is not None and node.get_closest_marker("launcher") is None:
        raise AssertionError(f"{node.nodeid} starts processes: mark it @pytest.mark.launcher "
                             "(the fast loop, pytest -m 'not launcher', skips those)")


@contextlib.contextmanager
def _fresh_tmpdir():
    """The environment for a launch, with a TMPDIR of its own (removed after): StreamingDataset keeps
    its file locks there, and stale ones left by other processes must not meet this run's."""
    path = tempfile.mkdtemp(prefix="cg-")
    try:
        yield {**os.environ, "TMPDIR": path}
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _own_shm(cmd: list[str]) -> list[str]:
    """``cmd`` in a mount namespace with an empty /dev/shm of its own."""
    import shlex

    return ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs tmpfs /dev/shm && exec {shlex.join(cmd)}"]


def launch(script: str, args: list[str], workdir, own_shm: bool = False):
    """Run ``composer -n 2 SCRIPT ARGS`` on the CPU, on a free port, logging each rank to workdir.

    ``own_shm``: where possible, in a /dev/shm of its own, so that StreamingDataset's shared-memory
    names cannot collide with other processes on the machine (the two ranks still share theirs).
    """
    import socket
    import subprocess

    _require_launcher_mark()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["composer", "-n", "2", "--master_port", str(port), "--stdout", str(workdir / "out{rank}.txt"),
           "--stderr", str(workdir / "err{rank}.txt"), script, *args]
    if own_shm and own_shm_available():
        cmd = _own_shm(cmd)
    with _fresh_tmpdir() as env:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(workdir), env=env)


def launch_nodes(script: str, args: list[str], workdirs: list, timeout: int = 600) -> list:
    """Nodes of one rank each on loopback: one ``composer -n 1 --world_size N --node_rank K`` launcher
    per work dir (run there), each with its own /dev/shm (StreamingDataset's shared memory would
    collide). Returns the finished processes, with ``out`` and ``err``: the rank's own output (a
    local rank 0 writes to its launcher's)."""
    import socket
    import subprocess

    _require_launcher_mark()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    with contextlib.ExitStack() as stack:
        for rank, workdir in enumerate(workdirs):
            cmd = ["composer", "-n", "1", "--world_size", str(len(workdirs)), "--node_rank", str(rank),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), script, *args]
            procs.append(subprocess.Popen(_own_shm(cmd), cwd=str(workdir), env=stack.enter_context(_fresh_tmpdir()),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for proc in procs:
            proc.out, proc.err = proc.communicate(timeout=timeout)
    return procs


def fsdp_runs(recipe: dict, runs: list[str], workdir) -> list[dict]:
    """``tests/scripts/fsdp_runs.py`` under ``composer -n 2`` (own /dev/shm): ``recipe`` trained as each
    of ``runs`` (``ddp``, ``sharded``, ``sharded@CKPT``, ...). Returns each rank's results, by run."""
    import json

    import yaml

    path = workdir / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "fsdp_runs.py")
    proc = launch(script, [str(path), str(workdir / "p{rank}.json"), *runs], workdir, own_shm=True)
    assert proc.returncode == 0, launch_failure(proc, workdir)
    return [json.loads((workdir / f"p{rank}.json").read_text()) for rank in (0, 1)]


def launch_failure(proc, workdir) -> str:
    logs = [f.read_text()[-2000:] for f in sorted(workdir.glob("err*.txt"))]
    return proc.stderr[-2000:] + "".join(logs)


def read_summary(path) -> dict:
    import json

    with open(path) as f:
        return json.load(f)


def resume_from(recipe: dict, checkpoint: str, workdir, callbacks=()):
    """Run ``recipe`` as a run that stopped right after ``checkpoint`` (a file in its save folder).

    The resumed run's save folder holds only that checkpoint, and ``autoresume`` finds it.
    ``callbacks`` join the run's. Returns the trainer and the resumed run's summary.
    """
    import shutil

    from composer_growth.recipe import run, validate

    resumed = dict(recipe, save_folder=str(workdir / "resumed"), summary_file=str(workdir / "resumed.json"),
                   autoresume=True)
    os.makedirs(resumed["save_folder"])
    shutil.copy(os.path.join(recipe["save_folder"], checkpoint), resumed["save_folder"])
    os.symlink(checkpoint, os.path.join(resumed["save_folder"], "latest-rank0.pt"))
    plan = validate(resumed)
    plan.callbacks.extend(callbacks)
    trainer = run(plan)
    return trainer, read_summary(resumed["summary_file"])


class Accel:
    """Where a device-aware test runs: ``device`` (Composer's: gpu / cpu), ``torch_device``, the Trainer's
    ``precision`` and the tolerances comparisons on it take."""

    def __init__(self, device: str, torch_device: str, precision: str, atol: float, rtol: float):
        self.device, self.torch_device, self.precision, self.atol, self.rtol = device, torch_device, precision, atol, rtol

    @property
    def cuda(self) -> bool:
        return self.device == "gpu"

    def recipe(self, recipe: dict) -> dict:
        """``recipe`` run on this device at this precision."""
        return {**recipe, "device": self.device, "precision": self.precision}


@pytest.fixture
def accel():
    """``cuda`` with ``amp_bf16`` where a GPU is present (deterministic algorithms on, bf16 tolerances),
    else the CPU in fp32 (tight tolerances). Tests that must hold on CUDA use it."""
    import torch

    if not torch.cuda.is_available():
        yield Accel("cpu", "cpu", "fp32", atol=1e-6, rtol=1e-5)
        return
    from composer.utils.reproducibility import configure_deterministic_mode

    configure_deterministic_mode()  # cuBLAS / cuDNN are not bitwise deterministic otherwise
    yield Accel("gpu", "cuda", "amp_bf16", atol=2e-2, rtol=2e-2)
    torch.use_deterministic_algorithms(False)
