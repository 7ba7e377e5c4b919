"""The operator contract every fused backend implements, registered once.

One call of the BLV loss is a :class:`~blv_kernels.problem.BLVProblem`. A fused backend (``backends/``) computes,
in one read of the logits, the loss and, when autograd will need it, the gradient of the loss
for a ``grad_output`` of 1; the backward only scales that gradient by the real ``grad_output``,
in place, and on the device reads nothing when it is exactly 1 (``loss.backward()`` of a
"mean" or "sum" loss). So forward+backward moves the logits' bytes twice, like a copy, and the
only extra memory is the gradient itself.

``blv_kernels::fused_blv_cross_entropy`` is that call as a ``torch.library`` op with a fake
(meta) implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` traces
through it and ``torch.library.opcheck`` passes. Eager calls on plain tensors, outside any
dispatch mode, skip the op's dispatch (its Python autograd wrapper costs more than a small
batch's kernels) through ``_EagerFusedLoss``, an ``autograd.Function`` that calls the same
forward and the same backward. Everything a training loop may change between steps without
recompiling is a tensor argument: the seed, the variation parameters (from sigma:
``noise.variation_params_tensor``) and ``avg_factor``.

The math of one position, the reductions and the label rule are spelled out in
``csrc/blv_kernel.h``; in short, ``F.cross_entropy(z, target, weight, ignore_index, reduction,
label_smoothing)`` of the perturbed logits ``z = x + v * w`` in float32, times the position
weights, the result in the logits' dtype (float32 for half logits under autocast:
``problem.loss_dtype``). Weights are constants: no backend differentiates
with respect to them (``_validation.check_constant_weights``).
"""

from __future__ import annotations

import torch
from torch import nn

from ._layout import empty_gradient
from .backends import BACKENDS, get_backend
from .problem import BLVProblem, check_problem

__all__ = ["fused_blv_cross_entropy", "fused_loss"]


@torch.library.custom_op("blv_kernels::fused_blv_cross_entropy", mutates_args=())
def fused_blv_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    variation_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    position_weight: torch.Tensor | None,
    seed: torch.Tensor,
    variation_params: torch.Tensor,
    avg_factor: torch.Tensor | None,
    offset: int,
    ignore_index: int,
    reduction: str,
    mode: str,
    label_smoothing: float,
    loss_dtype: torch.dtype,
    compute_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient of the loss for a grad_output of 1; an empty tensor unless compute_grad)."""
    problem = BLVProblem(
        logits=logits, target=target, variation_weight=variation_weight, class_weight=class_weight,
        position_weight=position_weight, seed=seed, variation_params=variation_params, avg_factor=avg_factor,
        offset=offset, ignore_index=ignore_index, reduction=reduction, mode=mode, label_smoothing=label_smoothing,
        loss_dtype=loss_dtype,
    )  # fmt: skip
    _check_call(problem, backend)
    return get_backend(backend).implementation().forward(problem, compute_grad=compute_grad)


_ARGUMENTS = [a.name for a in fused_blv_cross_entropy._opoverload._schema.arguments]


def _named(inputs) -> dict:
    return dict(zip(_ARGUMENTS, inputs, strict=True))


def _check_call(problem: BLVProblem, backend: str) -> None:
    """The op is public (``torch.ops.blv_kernels.fused_blv_cross_entropy``): a direct call gets the
    checks of ``blv_cross_entropy_from_weights``, so that no kernel reads out of bounds. In the op
    itself, with the values a compiled graph passes at run time (its fake sees symbolic offsets and
    ignore indices); metadata only, a few microseconds (eager training calls ``_EagerFusedLoss``, which
    skips the op)."""
    chosen = get_backend(backend)
    if not chosen.fused:
        raise ValueError(
            f"backend={backend!r} is not a fused backend: the op runs {[b for b in BACKENDS if BACKENDS[b].fused]}"
        )
    error = chosen.why_not(problem.logits.device.type, problem.logits.dtype)  # the schema makes logits a tensor
    if error is not None:
        raise error
    check_problem(problem)


@fused_blv_cross_entropy.register_fake
def _(*inputs):
    a = _named(inputs)
    logits = a["logits"]
    loss = logits.new_empty(a["target"].shape if a["reduction"] == "none" else (), dtype=a["loss_dtype"])
    return loss, empty_gradient(logits) if a["compute_grad"] else logits.new_empty(0)


def _setup_context(ctx, inputs, output):
    a = _named(inputs)
    ctx.save_for_backward(output[1], a["target"] if a["reduction"] == "none" else None)
    # the gradient output has no gradient: without these autograd would pass a zero-filled one, a write of the logits' size
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.backend, ctx.compute_grad = a["reduction"], a["backend"], a["compute_grad"]
    ctx.ignore_index = a["ignore_index"]


def _scaled_gradient(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
    """dL/dlogits = the forward's gradient times grad_output (per position for "none"), in place."""
    try:
        grad, target = ctx.saved_tensors
    except RuntimeError as err:  # the saved gradient was already scaled in place
        raise RuntimeError(
            "the fused BLV loss's backward already ran for this forward (it scales the forward's gradient in "
            "place): backward through it once, or use backend='reference' to backward twice"
        ) from err
    if ctx.reduction == "none":
        # an ignored position's gradient is 0 whatever its grad_output, as F.cross_entropy's, not 0 * inf = NaN
        # (loss.sqrt() has an infinite derivative where the loss is 0); the labels compared in int64, as uint8
        # compared with -100 would wrap it to 156, a class where C > 156
        grad_loss = torch.where(target.long() != ctx.ignore_index, grad_loss, 0).unsqueeze(1)
    if type(grad) is not torch.Tensor:  # traced (torch.compile, opcheck): stay functional
        return (grad * grad_loss.float()).to(grad.dtype)
    if torch.is_grad_enabled():
        raise RuntimeError(
            "double backward (create_graph=True) is not supported by the fused BLV backends: use backend='reference'"
        )
    if ctx.reduction == "none":
        grad.mul_(grad_loss)
    else:
        get_backend(ctx.backend).implementation().scale_grad_(grad, grad_loss.float())
        torch.autograd.graph.increment_version(grad)  # the kernel wrote it: a second backward must see that
    # the forward's output, handed over as the gradient: detached from the forward's graph (no copy)
    return grad.detach()


def _backward(ctx, grad_loss, _):
    if not ctx.compute_grad:  # (a direct call of the op: fused_loss asks for it whenever autograd will)
        raise RuntimeError(
            "blv_kernels::fused_blv_cross_entropy was called with compute_grad=False, so it computed no gradient "
            "to backward through: call it with compute_grad=True"
        )
    return _scaled_gradient(ctx, grad_loss), *[None] * (len(_ARGUMENTS) - 1)


fused_blv_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def fused_loss(problem: BLVProblem, backend: str) -> torch.Tensor:
    """The loss of ``problem`` through the fused op on ``backend``, differentiable in the logits."""
    compiling = torch.compiler.is_compiling()
    if not compiling and torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            "torch.func transforms (grad, vmap, ...) are not supported by the fused BLV backends: use "
            "backend='reference'"
        )
    compute_grad = torch.is_grad_enabled() and problem.logits.requires_grad
    if compiling or torch._C._len_torch_dispatch_stack() or type(problem.logits) not in (torch.Tensor, nn.Parameter):
        # traced, under a dispatch mode (fake tensors, sanitizers, counters) or a tensor subclass: the op,
        # which they see as one call, with its fake and functional backward
        loss, _ = fused_blv_cross_entropy(
            problem.logits, problem.target, problem.variation_weight, problem.class_weight, problem.position_weight,
            problem.seed, problem.variation_params, problem.avg_factor, problem.offset, problem.ignore_index,
            problem.reduction, problem.mode, problem.label_smoothing, problem.loss_dtype, compute_grad, backend,
        )  # fmt: skip
        return loss
    return _EagerFusedLoss.apply(problem.logits, problem, backend, compute_grad)


class _EagerFusedLoss(torch.autograd.Function):
    """The op's forward and backward for plain tensors outside tracing and dispatch modes, without
    its dispatch (the custom op's autograd wrapper took 148 us of a 274 us step at 8 x 1000 on a CPU)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, problem: BLVProblem, backend: str, compute_grad: bool) -> torch.Tensor:
        loss, grad = get_backend(backend).implementation().forward(problem, compute_grad=compute_grad)
        ctx.save_for_backward(grad, problem.target if problem.reduction == "none" else None)
        ctx.reduction, ctx.backend, ctx.ignore_index = problem.reduction, backend, problem.ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _scaled_gradient(ctx, grad_loss), None, None, None
