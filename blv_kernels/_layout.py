"""Addressing a tensor as (N, [C,] S) through strides: the layout rule every fused backend shares.

The kernels see the logits as (N, C, S), S the product of the spatial sizes, through three
strides; that needs the spatial dims to form one strided run (NCHW, channels_last, (N, C)
rows, expanded views do). Other views are copied (inputs) or allocated contiguous (outputs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .problem import BLVProblem

__all__ = [
    "spatial_stride",
    "as_ncs",
    "empty_gradient",
    "STRIDE_NAMES",
    "NCSLayout",
    "ncs_layout",
    "NCSTensors",
    "ncs_tensors",
]


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
    if stride_s is None and t.numel() == 0:  # nothing is read, and .contiguous() keeps such a view's strides
        stride_s = 1
    elif stride_s is None:
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


STRIDE_NAMES = ("stride_xn", "stride_xc", "stride_xs", "stride_tn", "stride_ts", "stride_wn", "stride_ws",
                "stride_gn", "stride_gc", "stride_gs")  # fmt: skip


@dataclass(frozen=True)
class NCSLayout:
    """How a problem's tensors are addressed, from their shapes and strides alone: which inputs are
    copied first, the gradient buffer's strides, and the (N, [C,] S) strides of each."""

    logits_shape: torch.Size
    copy_logits: bool
    copy_target: bool
    copy_position_weight: bool
    grad_strides: tuple[int, ...] | None  # None unless compute_grad
    strides: tuple[int, ...]  # the values of STRIDE_NAMES (0 for a missing tensor)

    @property
    def named_strides(self) -> dict[str, int]:
        """``strides`` by name: stride_x{n,c,s}, stride_t{n,s}, stride_w{n,s}, stride_g{n,c,s}."""
        return dict(zip(STRIDE_NAMES, self.strides, strict=True))


@functools.lru_cache(maxsize=1024)
def ncs_layout(logits_shape: torch.Size, logits_strides: tuple[int, ...], target_strides: tuple[int, ...],
               position_weight_strides: tuple[int, ...] | None, compute_grad: bool) -> NCSLayout:  # fmt: skip
    """The layout of tensors of these strides (the target and the position weight have the logits'
    shape without C): ``as_ncs`` and ``empty_gradient`` run once per key, on meta tensors, rather
    than at every call (a few microseconds of the host's time per loss; a new key costs about 50).
    The gradient's strides are meta's ``empty_like``'s, as the op's fake gives them: for empty
    tensors and in size-1 dims, which no kernel steps through, a device's may differ."""
    target_shape = logits_shape[:1] + logits_shape[2:]

    def meta(shape, strides):
        return torch.empty_strided(shape, strides, device="meta")

    logits, target = meta(logits_shape, logits_strides), meta(target_shape, target_strides)
    addressed_logits, x_strides = as_ncs(logits, 2)
    addressed_target, t_strides = as_ncs(target, 1)
    copy_weight, w_strides = False, (0, 0)
    if position_weight_strides is not None:
        weight = meta(target_shape, position_weight_strides)
        addressed_weight, w_strides = as_ncs(weight, 1)
        copy_weight = addressed_weight is not weight
    grad_strides, g_strides = None, (0, 0, 0)
    if compute_grad:
        grad = empty_gradient(logits)
        _, g_strides = as_ncs(grad, 2)  # no copy: empty_gradient gives an (N, C, S) layout
        grad_strides = grad.stride()
    return NCSLayout(logits_shape, addressed_logits is not logits, addressed_target is not target, copy_weight,
                     grad_strides, (*x_strides, *t_strides, *w_strides, *g_strides))  # fmt: skip


@dataclass(frozen=True)
class NCSTensors:
    """A problem's tensors as a fused backend's kernels address them (``as_ncs``), and the gradient's buffer."""

    logits: torch.Tensor
    target: torch.Tensor
    position_weight: torch.Tensor | None
    grad: torch.Tensor | None  # None unless compute_grad
    layout: NCSLayout

    @property
    def strides(self) -> dict[str, int]:
        return self.layout.named_strides


def ncs_tensors(problem: BLVProblem, *, compute_grad: bool) -> NCSTensors:
    logits, target, weight = problem.logits, problem.target, problem.position_weight
    layout = ncs_layout(logits.shape, logits.stride(), target.stride(), None if weight is None else weight.stride(),
                        compute_grad)  # fmt: skip
    grad = None
    if compute_grad:
        grad = torch.empty_strided(logits.shape, layout.grad_strides, dtype=logits.dtype, device=logits.device)
    return NCSTensors(
        logits.contiguous() if layout.copy_logits else logits, target.contiguous() if layout.copy_target else target,
        weight.contiguous() if layout.copy_position_weight else weight, grad, layout,
    )  # fmt: skip
