"""Calibration: activation statistics for data-aware passes, recorded on effc's own FX graphs.

`statistics` holds what is recorded (`Calibration`, save/load), `observer` the backend that
instruments Dynamo's graphs, and `run` the `effc.calibrate(model, batches)` entry point.
"""

from effc.compiler.calibration.run import calibrate
from effc.compiler.calibration.statistics import (CALIBRATION_VERSION, WHAT, Calibration,
                                                  HeadMoments, InputMoment, ResidualNorms)

__all__ = ["CALIBRATION_VERSION", "WHAT", "Calibration", "HeadMoments", "InputMoment",
           "ResidualNorms", "calibrate"]
