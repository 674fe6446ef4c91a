"""Composer algorithms: when to act, and the state to resume from."""

from composer_growth.algorithms.context_schedule import ContextLengthSchedule
from composer_growth.algorithms.growth import StackLayers, WidenMLP
from composer_growth.algorithms.lora_merge import LoraMergeRestart
from composer_growth.algorithms.orchestrator import Orchestrator
from composer_growth.algorithms.seq_length_warmup import SeqLengthWarmup

__all__ = ["ContextLengthSchedule", "LoraMergeRestart", "Orchestrator", "SeqLengthWarmup", "StackLayers", "WidenMLP"]


def batch_length_order(algorithms, event):
    """Composer algorithm pass: at ``AFTER_DATALOADER`` the context schedule acts first.

    It sets the phase's length (and data); a warmup then shortens batches within the phase. Composer
    runs ``AFTER_*`` events in reverse list order, so without this pass the order would depend on
    how a recipe lists them. Pass it as ``Trainer(algorithm_passes=[batch_length_order])``.
    """
    from composer.core import Event

    if event == Event.AFTER_DATALOADER:
        return sorted(algorithms, key=lambda a: not isinstance(a, ContextLengthSchedule))
    return algorithms
