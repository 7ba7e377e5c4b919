"""Addressing a tensor as (N, [C,] S) through strides: the layout rule every fused backend shares.

The kernels see the logits as (N, C, S), S the product of the spatial sizes, through three
strides; that needs the spatial dims to form one strided run (NCHW, channels_last, (N, C)
rows, expanded views do). Other views are copied (inputs) or allocated contiguous (outputs).
"""

from __future__ import annotations

import torch

__all__ = ["spatial_stride", "as_ncs", "empty_gradient"]


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
