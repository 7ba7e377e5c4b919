"""Finding the BLV losses a training-time helper acts on."""

from __future__ import annotations

from torch import nn

from ..loss import BLVLoss


def blv_losses(module: nn.Module) -> list[BLVLoss]:
    """Every :class:`BLVLoss` in ``module`` (itself included; wrappers such as DDP are walked through)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a BLVLoss or a module containing one, got {type(module).__name__}")
    found = [m for m in module.modules() if isinstance(m, BLVLoss)]
    if not found:
        raise ValueError(f"no BLVLoss found in {type(module).__name__}: nothing to update")
    return found
