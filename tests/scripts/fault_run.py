"""``composer-growth train`` with a record of what happened, and optionally a ``kill -9``.

    fault_run.py LOG KILL RECIPE [key=value ...]

Runs the CLI's own path (one-line errors included). Rank 0 appends JSON lines to LOG: where the run
started (batch, load_path), each batch's training loss, and, with KILL=event, the batch at whose
checkpoint event the process sent itself SIGKILL: the first batch at which an algorithm recorded an
event (a growth, a phase change, a merge, an orchestrator op), after that batch's evals and before
Composer writes its checkpoint. KILL=none runs to the end.
"""

import json
import os
import signal
import sys

import torch
from composer.core import Callback
from composer.utils import dist

import composer_growth.recipe as recipe_module
from composer_growth import cli
from composer_growth.algorithms import SuiteAlgorithm


def event_batches(state) -> list[int]:
    return sorted(e["batch"] for a in state.algorithms if isinstance(a, SuiteAlgorithm) for e in a.run_events())


class Faults(Callback):
    def __init__(self, log: str, kill: str):
        self.log, self.kill, self.seen = log, kill, None

    def _write(self, entry: dict) -> None:
        if dist.get_global_rank() == 0:
            with open(self.log, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def fit_start(self, state, logger):
        self.seen = len(event_batches(state))
        self._write({"start": int(state.timestamp.batch), "load_path": state.load_path})

    def batch_end(self, state, logger):
        self._write({"batch": int(state.timestamp.batch), "loss": float(state.loss.detach())})

    def batch_checkpoint(self, state, logger):
        batches = event_batches(state)
        if self.kill == "event" and len(batches) > self.seen:
            self._write({"killed": int(state.timestamp.batch), "events": batches})
            os.kill(os.getpid(), signal.SIGKILL)


log, kill, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.set_num_threads(1)
original = recipe_module.run


def run(plan):
    plan.callbacks.append(Faults(log, kill))
    return original(plan)


recipe_module.run = run
sys.exit(cli.main(["train", *argv]))
