"""Calibration statistics for data-aware passes, keyed by the names passes use (weight FQNs).

`Calibration` holds, per site, streaming sums (never stored activations): for a linear/conv
site, the input second moment sum_x x x^T in float64 and the number of rows it summed.
Passes read `ctx.calibration.input_moment(weight_name)`.
"""

from __future__ import annotations

import dataclasses

import torch

CALIBRATION_VERSION = 1


@dataclasses.dataclass
class InputMoment:
    """sum over rows of x x^T (float64, [K, K]) and the row count, for one weight's input."""

    sum_xxt: torch.Tensor
    rows: int

    def mean(self) -> torch.Tensor:
        return self.sum_xxt / max(self.rows, 1)


@dataclasses.dataclass
class Calibration:
    """Activation statistics of one model, per weight FQN; pass as options={"calibration": c}."""

    inputs: dict[str, InputMoment] = dataclasses.field(default_factory=dict)
    weight_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    version: int = CALIBRATION_VERSION

    @classmethod
    def from_moments(cls, moments: dict[str, torch.Tensor], rows: int = 1,
                     weight_shapes: dict[str, tuple[int, ...]] | None = None) -> Calibration:
        """Statistics given directly: weight name -> E[x x^T] (or a sum with `rows`)."""
        return cls({k: InputMoment(v.to(torch.float64) * rows, rows) for k, v in moments.items()},
                   dict(weight_shapes or {}))

    def input_moment(self, weight_name: str) -> torch.Tensor | None:
        """E[x x^T] of the input of the site that uses `weight_name`, or None if not recorded."""
        m = self.inputs.get(weight_name)
        return None if m is None else m.mean()

    def lookup(self, weight_name: str, weight_shape: tuple[int, ...]
               ) -> tuple[torch.Tensor | None, str]:
        """(E[x x^T], "") for a site, or (None, why not): missing, or recorded for another model."""
        m = self.inputs.get(weight_name)
        if m is None:
            return None, f"calibration has no statistics for {weight_name}"
        recorded = self.weight_shapes.get(weight_name)
        if recorded is not None and tuple(recorded) != tuple(weight_shape):
            return None, (f"calibration was recorded for {weight_name} of shape {tuple(recorded)}, "
                          f"this model's is {tuple(weight_shape)} (a different model?)")
        return m.mean(), ""
