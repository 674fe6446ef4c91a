"""Loss-triggered orchestration (:class:`Orchestrator`): an ordered schedule of operations.

``algorithm``: the Composer Algorithm (when ops fire, what the checkpoint holds); ``ops``: the
operations (:data:`OPS`, :class:`OpKind`, :class:`RunContext`); ``schedule``: reading and checking a
schedule; ``values``: the checkers of values and options; ``report``: what it prints and summarises.
"""

from composer_growth.algorithms.orchestrator.algorithm import Orchestrator, eval_metric
from composer_growth.algorithms.orchestrator.ops import OPS, OpKind, RunContext, Skip
from composer_growth.algorithms.orchestrator.schedule import DEFAULT_MONITOR, Op, load_schedule, parse_monitor, parse_op

__all__ = ["DEFAULT_MONITOR", "OPS", "Op", "OpKind", "Orchestrator", "RunContext", "Skip", "eval_metric",
           "load_schedule", "parse_monitor", "parse_op"]
