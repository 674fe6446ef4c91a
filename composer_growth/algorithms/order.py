"""One order for the algorithms that set a batch's length, whatever order they are listed in.

Composer runs ``AFTER_*`` events in reverse list order, and llm-foundry's YAML cannot pass
``algorithm_passes``. So each length algorithm, at ``AFTER_DATALOADER``, calls
:func:`set_batch_lengths`, which runs the length step (``set_batch_length``) of every length
algorithm of the Trainer in the order of their ``length_rank`` (the context schedule's phase
first, then a warmup inside the phase), once per batch: the first caller does the work, the
others find it done.
"""

from __future__ import annotations

from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from composer_growth.algorithms.base import SuiteAlgorithm
from composer_growth.algorithms.composer_hooks import first_call_this_batch


def set_batch_lengths(caller: Algorithm, state: State, logger: Logger) -> None:
    """Run every length algorithm's ``set_batch_length(state, logger)`` once for this batch, by ``length_rank``."""
    if not first_call_this_batch(state):
        return
    algorithms = list(state.algorithms)
    if not any(a is caller for a in algorithms):
        algorithms.append(caller)  # called outside a Trainer's list: it still acts
    active = [a for a in algorithms if isinstance(a, SuiteAlgorithm) and a.length_rank is not None
              and a.match(Event.AFTER_DATALOADER, state)]
    for algorithm in sorted(active, key=lambda a: a.length_rank):  # stable: equal ranks keep list order
        algorithm.set_batch_length(state, logger)
