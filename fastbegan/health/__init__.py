"""Training health: cheap checks for BEGAN's common failures, live and after the fact.

:mod:`.rules` finds them in metrics rows (:class:`HealthTracker`, :func:`diagnose_run` for
a finished run's metrics.jsonl); :mod:`.monitor` is the live hook on the trainer
(:class:`HealthMonitor`: the batch signals, warn / stop / restore). The messages and what
to do: docs/health.md.
"""
from ..runlog import read_metrics
from .monitor import MAX_RESTORES, ON_COLLAPSE, HealthMonitor, batch_contrast, batch_diversity
from .rules import COLLAPSE_RATIO, DEFAULT_PATIENCE, REMEDY_FLAGS, Finding, HealthTracker, diagnose_run

__all__ = ["HealthMonitor", "HealthTracker", "Finding", "diagnose_run", "read_metrics", "batch_diversity",
           "batch_contrast", "REMEDY_FLAGS", "DEFAULT_PATIENCE", "COLLAPSE_RATIO", "ON_COLLAPSE",
           "MAX_RESTORES"]
