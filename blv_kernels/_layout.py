"""Addressing a tensor as (N, [C,] S) through strides: the layout rule every fused backend shares.

The kernels see the logits as (N, C, S), S the product of the spatial sizes, through three
strides; that needs the spatial dims to form one strided run (NCHW, channels_last, (N, C)
rows, expanded views do). Other views are copied (inputs) or allocated contiguous (outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .problem import BLVProblem

__all__ = ["spatial_stride", "as_ncs", "empty_gradient", "NCSTensors", "ncs_tensors"]


def spatial_stride(shape, strides) -> int | None:
    """The single stride of the flattened spatial dims, or None when they are not one strided run."""
    dims = [(size, stride) for size, stride in zip(shape, strides, strict=True) if size != 1]
    if any(outer != inner * size for (_, outer), (size, inner) in zip(dims, dims[1:], strict=False)):
        return None
    return dims[-1][1] if dims else 1


def as_ncs(t: torch.Tensor, lead: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``t`` addressed as (N, [C,] S): its ``lead`` leading strides and one spatial stride.

    NCHW, channels_last, expanded (stride 0) and sliced batch/class views need no copy; spatial
    dims that are not one strided run (e.g. a crop of W) are made contiguous first.
    """
    stride_s = spatial_stride(t.shape[lead:], t.stride()[lead:])
    if stride_s is None:
        t = t.contiguous()
        stride_s = spatial_stride(t.shape[lead:], t.stride()[lead:])
    return t, (*t.stride()[:lead], stride_s)


def empty_gradient(logits: torch.Tensor) -> torch.Tensor:
    """The gradient's buffer: the logits' layout where it is an (N, C, S) one (NCHW,
    channels_last, rows), else contiguous (e.g. a dense but permuted (N, H, C, W) order)."""
    grad = torch.empty_like(logits)
    if spatial_stride(grad.shape[2:], grad.stride()[2:]) is None:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return grad


@dataclass(frozen=True)
class NCSTensors:
    """A problem's tensors as a fused backend's kernels address them (``as_ncs``), and the gradient's buffer."""

    logits: torch.Tensor
    target: torch.Tensor
    position_weight: torch.Tensor | None
    grad: torch.Tensor | None  # None unless compute_grad
    strides: dict[str, int]  # stride_x{n,c,s}, stride_t{n,s}, stride_w{n,s}, stride_g{n,c,s} (0 for a missing tensor)


def ncs_tensors(problem: BLVProblem, *, compute_grad: bool) -> NCSTensors:
    logits, (sxn, sxc, sxs) = as_ncs(problem.logits, 2)
    target, (stn, sts) = as_ncs(problem.target, 1)
    position_weight, (swn, sws) = None, (0, 0)
    if problem.position_weight is not None:
        position_weight, (swn, sws) = as_ncs(problem.position_weight, 1)
    grad, (sgn, sgc, sgs) = None, (0, 0, 0)
    if compute_grad:
        grad = empty_gradient(problem.logits)
        _, (sgn, sgc, sgs) = as_ncs(grad, 2)  # no copy: empty_gradient gives an (N, C, S) layout
    strides = dict(stride_xn=sxn, stride_xc=sxc, stride_xs=sxs, stride_tn=stn, stride_ts=sts, stride_wn=swn,
                   stride_ws=sws, stride_gn=sgn, stride_gc=sgc, stride_gs=sgs)  # fmt: skip
    return NCSTensors(logits, target, position_weight, grad, strides)
