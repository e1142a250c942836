"""Calibration moved to :mod:`modelparallel.cost_model.measure.calibrate` (torch); the names stay
importable from here."""

from modelparallel.cost_model.measure.calibrate import calibrate, op_overhead

__all__ = ["calibrate", "op_overhead"]
