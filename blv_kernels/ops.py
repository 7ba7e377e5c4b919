"""The fused BLV loss as a torch.library op: fake (meta) and autograd registration.

``blv_kernels::blv_cross_entropy_fwd`` returns (loss, lse, denom) and saves nothing but its
inputs and lse; its backward is ``blv_kernels::blv_cross_entropy_bwd``, which recomputes the
noise and the softmax (see ``kernels/blv_cross_entropy.py`` for why). Registered with
``register_fake`` and ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces
through it and ``torch.library.opcheck`` passes.
"""

from __future__ import annotations

import torch

from . import kernels
from ._layout import empty_gradient


@torch.library.custom_op("blv_kernels::blv_cross_entropy_fwd", mutates_args=())
def blv_cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    variation_weight: torch.Tensor,
    seed: torch.Tensor,
    offset: int,
    sigma: torch.Tensor,
    mode: str,
    class_weight: torch.Tensor | None,
    position_weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.blv_ce_fwd(
        logits, target, variation_weight, seed, offset, sigma, mode, class_weight, position_weight,
        ignore_index, reduction,
    )  # fmt: skip


@blv_cross_entropy_fwd.register_fake
def _(logits, target, variation_weight, seed, offset, sigma, mode, class_weight, position_weight, ignore_index,
      reduction):  # fmt: skip
    loss = logits.new_empty(target.shape if reduction == "none" else ())
    lse = logits.new_empty(target.numel(), dtype=torch.float32)
    return loss, lse, logits.new_empty((), dtype=torch.float32)


@torch.library.custom_op("blv_kernels::blv_cross_entropy_bwd", mutates_args=())
def blv_cross_entropy_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    variation_weight: torch.Tensor,
    seed: torch.Tensor,
    offset: int,
    sigma: torch.Tensor,
    mode: str,
    class_weight: torch.Tensor | None,
    position_weight: torch.Tensor | None,
    lse: torch.Tensor,
    denom: torch.Tensor,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    return kernels.blv_ce_bwd(
        grad_loss, logits, target, variation_weight, seed, offset, sigma, mode, class_weight, position_weight,
        lse, denom, ignore_index, reduction,
    )  # fmt: skip


@blv_cross_entropy_bwd.register_fake
def _(grad_loss, logits, *args):
    return empty_gradient(logits)


def _setup_context(ctx, inputs, output):
    (logits, target, variation_weight, seed, offset, sigma, mode, class_weight, position_weight,
     ignore_index, reduction) = inputs  # fmt: skip
    _, lse, denom = output
    ctx.save_for_backward(logits, target, variation_weight, seed, sigma, class_weight, position_weight, lse, denom)
    ctx.options = (offset, mode, ignore_index, reduction)


def _backward(ctx, grad_loss, grad_lse, grad_denom):
    logits, target, variation_weight, seed, sigma, class_weight, position_weight, lse, denom = ctx.saved_tensors
    offset, mode, ignore_index, reduction = ctx.options
    grad = blv_cross_entropy_bwd(
        grad_loss, logits, target, variation_weight, seed, offset, sigma, mode, class_weight, position_weight,
        lse, denom, ignore_index, reduction,
    )  # fmt: skip
    # Only the logits get a gradient; weights, labels and the seed are constants of the loss.
    return grad, None, None, None, None, None, None, None, None, None, None


blv_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
