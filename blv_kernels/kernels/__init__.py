"""Fused Triton kernels and their launchers."""

from .blv_cross_entropy import blv_ce_bwd, blv_ce_fwd

__all__ = ["blv_ce_fwd", "blv_ce_bwd"]
