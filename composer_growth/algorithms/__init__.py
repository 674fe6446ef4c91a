"""Composer algorithms: when to act, and the state to resume from."""

from composer_growth.algorithms.base import SuiteAlgorithm
from composer_growth.algorithms.context_schedule import ContextLengthSchedule
from composer_growth.algorithms.growth import StackLayers, WidenMLP
from composer_growth.algorithms.lora_merge import LoraMergeRestart
from composer_growth.algorithms.order import set_batch_lengths
from composer_growth.algorithms.orchestrator import Orchestrator
from composer_growth.algorithms.seq_length_warmup import SeqLengthWarmup

__all__ = ["ContextLengthSchedule", "LoraMergeRestart", "Orchestrator", "SeqLengthWarmup", "StackLayers",
           "SuiteAlgorithm", "WidenMLP", "set_batch_lengths"]
