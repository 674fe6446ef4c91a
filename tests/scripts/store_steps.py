"""The steps of ``store_runs.py``: runs that keep their checkpoints in an S3 object store, killed and resumed.

    store_runs.py RECIPES OUT STORE STEP [STEP ...]

RECIPES: a YAML file mapping a name to a recipe. STORE: an ``s3://bucket`` URI (the endpoint and the
credentials come from the environment: ``S3_ENDPOINT_URL``, ``AWS_*``). STEP, run in order:

* ``NAME.KIND``: recipe NAME trained uninterrupted, without checkpoints;
* ``NAME.KIND.kill``: the same with ``save_folder: STORE/NAME-KIND`` and ``autoresume``; once the checkpoint
  of the first batch at which an algorithm recorded an event (a growth, a merge) is in the store and its
  ``latest`` symlink there points at it, every rank sends itself SIGKILL, one batch later;
* ``NAME.KIND.resume``: that run again (``autoresume``); only the store holds its checkpoints;
* ``NAME.KIND.restart``: after a resume that finished, the run again, 2 batches longer: the working
  folder holds the copy of the checkpoint that the resume downloaded.

Every step of ``NAME.KIND`` with the store runs in one working folder of its own, which no other run uses.

KIND: ``ddp``, or ``sharded`` / ``full`` (FSDP2 with that ``state_dict_type``). Per rank, OUT (``{rank}``
formatted) gains one entry per finished step: each trained batch's loss (by batch number), where the run
started and what it loaded, the layer count, a checksum of every full parameter and the states of the
algorithms that replay. A killed step adds the batch of its checkpoint and the store's symlink text.
"""

import copy
import json
import os
import signal
import tempfile

import psutil
import torch
import yaml
from composer.callbacks import CheckpointSaver
from composer.core import Callback
from composer.utils import dist, maybe_create_object_store_from_uri

from composer_growth.algorithms import SuiteAlgorithm
from composer_growth.recipe import build_trainer, validate
from composer_growth.unwrap import composer_model, unwrap_hf


def event_batches(state) -> list[int]:
    return sorted(e["batch"] for a in state.algorithms if isinstance(a, SuiteAlgorithm) for e in a.run_events())


def write(out: str, name: str, entry: dict) -> None:
    path = out.format(rank=dist.get_global_rank())
    results = json.load(open(path)) if os.path.exists(path) else {}
    results[name] = entry
    with open(path, "w") as f:
        json.dump(results, f)


class Record(Callback):
    def __init__(self):
        self.losses, self.start, self.load_path = {}, None, None

    def fit_start(self, state, logger):
        self.start, self.load_path = int(state.timestamp.batch), state.load_path

    def batch_end(self, state, logger):
        self.losses[int(state.timestamp.batch)] = float(state.loss.detach())


def saver(state) -> CheckpointSaver:
    return next(c for c in state.callbacks if isinstance(c, CheckpointSaver))


class QuickSymlink(Callback):
    """Composer looks for a checkpoint's uploaded files every 30 s before it uploads the ``latest``
    symlink (an attribute it keeps for tests): every 0.5 s here."""

    def fit_start(self, state, logger):
        saver(state)._symlink_upload_wait_before_next_try_in_seconds = 0.5


class KillAfterEvent(Callback):
    """SIGKILL on every rank (and its child processes) one batch after the first checkpoint written at an
    event's batch, once the store holds that checkpoint and its symlink."""

    def __init__(self, out: str, name: str, save_folder: str):
        self.out, self.name, self.save_folder, self.target = out, name, save_folder, None

    def batch_checkpoint(self, state, logger):
        batch = int(state.timestamp.batch)
        if self.target is None:
            if event_batches(state) and event_batches(state)[0] == batch:
                self.target = batch  # Composer's saver, after this callback, writes this batch's checkpoint
            return
        saver(state).fit_end(state, logger)  # waits for the uploads, then uploads the symlink
        dist.barrier()
        store = maybe_create_object_store_from_uri(self.save_folder)
        prefix = self.save_folder.split("://", 1)[1].split("/", 1)[1]
        symlink = None
        if dist.get_global_rank() == 0:
            with tempfile.TemporaryDirectory() as tmp:
                store.download_object(f"{prefix}/latest-rank0.pt.symlink", os.path.join(tmp, "latest"))
                symlink = open(os.path.join(tmp, "latest")).read()
        write(self.out, self.name, {"checkpoint": self.target, "killed": batch, "symlink": symlink})
        dist.barrier()
        # the whole rank dies, as on a lost node: its upload processes too (spawned, they would outlive it)
        for child in psutil.Process().children(recursive=True):
            child.kill()
        os.kill(os.getpid(), signal.SIGKILL)


def with_kind(base: dict, kind: str) -> dict:
    recipe = dict(copy.deepcopy(base), summary_file=None)
    if kind != "ddp":
        recipe["parallelism"] = {"fsdp": {"version": 2, "state_dict_type": kind}}
    return recipe


def train(recipe: dict, callbacks: list) -> dict:
    plan = validate(recipe)
    record = Record()
    plan.callbacks.extend([record, *callbacks])
    trainer = build_trainer(plan)
    trainer.fit()
    model = composer_model(trainer.state)
    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[name] = float(full.detach().double().sum())
    out = {"losses": record.losses, "start": record.start, "load_path": record.load_path,
           "layers": unwrap_hf(model).config.num_hidden_layers, "params": params,
           "replayed": [a.state_dict() for a in trainer.state.algorithms if isinstance(a, SuiteAlgorithm)]}
    trainer.close()
    return out


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    recipes, out, store = yaml.safe_load(open(argv[0])), os.path.abspath(argv[1]), argv[2]
    work = os.path.dirname(out)
    for step in argv[3:]:
        name, kind, *action = step.split(".")
        recipe = with_kind(recipes[name], kind)
        folder = os.path.join(work, "cwd", f"{name}.{kind}")
        os.makedirs(folder, exist_ok=True)
        os.chdir(folder)
        callbacks = []
        if action:
            recipe.update(save_folder=f"{store}/{name}-{kind}", autoresume=True)
            callbacks.append(QuickSymlink())
            if action == ["kill"]:
                callbacks.append(KillAfterEvent(out, step, recipe["save_folder"]))
            if action == ["restart"]:
                recipe["max_duration"] = f"{int(recipe['max_duration'].removesuffix('ba')) + 2}ba"
        else:
            recipe["save_folder"] = None
        write(out, step, train(recipe, callbacks))
