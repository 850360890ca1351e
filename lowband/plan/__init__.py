"""`lowband plan` and `lowband probe`: which technique fits a network (docs/plan.md)."""

from lowband.plan.cost import Prediction, Technique, Workload, candidates, predict

__all__ = ["Prediction", "Technique", "Workload", "candidates", "predict"]
