"""composer-growth: Composer algorithms for growing and curriculum training of transformer LMs."""

from composer_growth import algorithms, functional
from composer_growth.algorithms import (ContextLengthSchedule, LoraMergeRestart, Orchestrator, SeqLengthWarmup,
                                        StackLayers, WidenMLP)
from composer_growth.callbacks import RunSummary
from composer_growth.errors import ConfigError
from composer_growth.families import FAMILIES, Family, family_of

__version__ = "0.1.0"
__all__ = ["FAMILIES", "ConfigError", "ContextLengthSchedule", "Family", "LoraMergeRestart", "Orchestrator", "RunSummary",
           "SeqLengthWarmup", "StackLayers", "WidenMLP",
           "algorithms", "family_of", "functional"]
