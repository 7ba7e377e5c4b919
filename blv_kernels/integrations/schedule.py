"""The temporal sigma schedule of the BLV supplement (section 3).

The supplement lets sigma rise gradually to ``sigma_0`` at iteration ``t_mid``, then fall so
that convergence is not disturbed (GTA5 -> Cityscapes with DAFormer: ``sigma_0 = 6``,
``t_mid = 30k``, ``t_end = 40k``; 69.6 -> 70.0 mIoU). It gives no formula, only a drawing, so
the curve here is our reading: from ``sigma_start`` at ``t = 0`` up to ``sigma_0`` at ``t_mid``,
then down to ``sigma_end`` at ``t_end`` and constant after it, each leg linear (default) or a
half cosine (flat at both of its ends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .._validation import integer, real
from ..noise import SIGMA_MAX
from ._modules import blv_losses

__all__ = ["SigmaSchedule"]

SHAPES = ("linear", "cosine")


@dataclass(frozen=True)
class SigmaSchedule:
    """``sigma(t)``: rises from ``sigma_start`` to ``sigma_0`` at ``t_mid``, falls to ``sigma_end`` at ``t_end``.

    Use ``loss.sigma = schedule(it)``, or ``schedule.step(model, it)`` once per iteration to
    set it on every :class:`~blv_kernels.BLVLoss` in ``model``. The schedule keeps no state,
    so resuming from a checkpoint at iteration ``it`` gives the same sigma. Numbers may be Python
    or numpy scalars; they are kept as Python floats and ints.
    """

    sigma_0: float
    t_mid: int
    t_end: int
    shape: str = "linear"
    sigma_start: float = 0.0
    sigma_end: float = 0.0

    def __post_init__(self) -> None:
        # frozen: the checked values are set through object.__setattr__; sigma bounded as the loss bounds it,
        # so that a bad schedule fails here, not at the step that reaches the value
        for name in ("sigma_0", "sigma_start", "sigma_end"):
            object.__setattr__(self, name, real(name, getattr(self, name), minimum=0.0, maximum=SIGMA_MAX))
        for name in ("t_mid", "t_end"):
            object.__setattr__(self, name, integer(name, getattr(self, name), minimum=0))
        if not (self.t_mid <= self.t_end and self.t_end > 0):
            raise ValueError(f"need 0 <= t_mid <= t_end and t_end > 0, got t_mid={self.t_mid}, t_end={self.t_end}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")

    def __call__(self, t: int) -> float:
        """Sigma at iteration ``t`` (an integer >= 0; constant ``sigma_end`` from ``t_end`` on)."""
        t = integer("iteration", t, minimum=0)
        if t < self.t_mid:
            return self._leg(self.sigma_start, self.sigma_0, t / self.t_mid)
        if t < self.t_end:
            return self._leg(self.sigma_0, self.sigma_end, (t - self.t_mid) / (self.t_end - self.t_mid))
        return float(self.sigma_end)

    def _leg(self, start: float, stop: float, r: float) -> float:
        if self.shape == "cosine":
            r = (1 - math.cos(math.pi * r)) / 2
        return start + (stop - start) * r

    def step(self, module: nn.Module, t: int) -> float:
        """Set ``sigma = self(t)`` on every BLVLoss in ``module`` (itself included); returns it."""
        sigma = self(t)
        for loss in blv_losses(module):
            loss.sigma = sigma
        return sigma
