"""The equivalence grid every fused backend runs: loss and gradient against the reference.

One case is a shape, a layout, a dtype and the loss's options. The grid covers every class-count
regime of the kernels (C = 1, 2, below one Philox group of four, the
Cityscapes/ADE/COCO-Stuff/ImageNet C, C above a class chunk, the Triton rows spread over 2 to 16
warps or, with contiguous classes, over 2 to 128 lanes), odd spatial sizes and N = 1, every
layout (NCHW, channels_last, (N, C) rows, 3-D, sliced and permuted views), every dtype, ignore
ratios 0 to 100%, every reduction, both weights, label smoothing, both modes and sigma in {0,
0.5, 4, 6} (0.5 takes the Giles erfinv path, 4 and 6 the polynomial one). Shapes stay small: on
a CPU the Triton kernels run under the interpreter and the CUDA kernels under emulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from blv_kernels import blv_cross_entropy

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    layout: str = "contiguous"  # contiguous, channels_last, class-sliced, permuted, cropped
    dtype: torch.dtype = torch.float32
    ignore: float = 0.2  # share of positions labelled ignore_index
    reduction: str = "mean"
    weight: bool = False  # class weights
    position_weight: bool = False
    mode: str = "abs"
    sigma: float = 6.0
    target_dtype: torch.dtype = torch.int64
    label_smoothing: float = 0.0

    @property
    def id(self) -> str:
        name = "x".join(map(str, self.shape)) + f"-{self.layout}-{str(self.dtype)[6:]}-ign{self.ignore}"
        name += f"-{self.reduction}-{self.mode}-s{self.sigma}-t{str(self.target_dtype)[6:]}"
        name += ("-w" if self.weight else "") + ("-pw" if self.position_weight else "")
        return name + (f"-ls{self.label_smoothing}" if self.label_smoothing else "")

    def param(self):
        return pytest.param(self, id=self.id)


CASES = [
    # realistic segmentation and classification shapes, scaled down
    Case((2, 19, 6, 10)),
    Case((2, 19, 6, 10), layout="channels_last", reduction="sum", target_dtype=torch.uint8),
    Case((1, 150, 3, 5), reduction="none", weight=True),
    Case((1, 171, 4, 3), layout="channels_last", mode="clamp", sigma=4.0, target_dtype=torch.int32),
    Case((8, 1000), weight=True, position_weight=True),
    Case((5, 67), reduction="none", mode="clamp"),  # C above one chunk of 64 classes
    Case((1, 67, 2, 3), layout="class-sliced", sigma=4.0),
    # the Triton rows over 2 and 16 warps (NCHW, 33 and 300 classes), a program's 32 positions
    # partial; with contiguous classes over 2 and 16 lanes (16 and 2 positions a warp, partial)
    Case((2, 33, 5, 7), weight=True),
    Case((1, 300, 3, 3), reduction="sum"),
    Case((2, 33, 5, 7), layout="channels_last", weight=True),
    Case((3, 300), reduction="sum", label_smoothing=0.1),
    Case((3, 2050), reduction="sum"),  # over 4 warps' lanes, a tail of one real group in 128
    # C = 1, 2, 3: below and at one Philox group of four classes
    Case((3, 1, 5, 7), reduction="none"),
    Case((4, 2, 3, 3), reduction="sum", mode="clamp"),
    Case((7, 3)),
    # odd spatial sizes, N = 1, 3-D volumes, views that need a copy
    Case((1, 19, 7, 13), reduction="none", position_weight=True, target_dtype=torch.uint8),
    Case((2, 5, 3, 4, 5), reduction="none", weight=True),
    Case((2, 5, 3, 4, 5), layout="channels_last"),
    Case((2, 19, 5, 9), layout="cropped", reduction="none"),
    Case((2, 19, 3, 5), layout="permuted", reduction="sum"),
    # int8 / int16 labels (ignore_index -100 a negative label): NCHW, class rows and channels_last, C=150 past int8
    Case((2, 19, 5, 7), reduction="none", target_dtype=torch.int8),
    Case((5, 67), reduction="sum", target_dtype=torch.int8),
    Case((1, 150, 3, 5), layout="channels_last", weight=True, target_dtype=torch.int16),
    # ignore ratios 0 and 100%, sigma 0 and the Giles path
    Case((2, 19, 4, 5), ignore=0.0, reduction="sum", weight=True),
    Case((2, 19, 4, 5), ignore=1.0),
    Case((2, 19, 4, 5), ignore=1.0, reduction="none", weight=True),
    Case((2, 19, 4, 5), sigma=0.0, weight=True),
    Case((2, 19, 4, 5), sigma=0.5, reduction="none"),
    Case((2, 19, 4, 5), sigma=0.5, mode="clamp", reduction="sum", position_weight=True),
    # label smoothing (F.cross_entropy's), with and without class weights
    Case((2, 19, 4, 5), label_smoothing=0.1),
    Case((1, 150, 3, 5), reduction="none", weight=True, label_smoothing=0.2, layout="channels_last"),
    Case((6, 67), reduction="sum", weight=True, position_weight=True, label_smoothing=1.0),
    # ... in Triton's two sweeps (above 384 classes NCHW, 10240 contiguous), whose second sweep sums
    # the smoothing terms: 389 and 10250 classes end in a partial chunk
    Case((1, 389, 2, 3), weight=True, label_smoothing=0.1),
    Case((3, 389), reduction="none", mode="clamp", label_smoothing=0.2),
    Case((2, 10250), weight=True, label_smoothing=0.1),
    # low precision: compared with PyTorch at that precision against a float64 ground truth
    Case((2, 19, 6, 10), dtype=torch.bfloat16),
    Case((2, 19, 6, 10), dtype=torch.float16, layout="channels_last", reduction="none"),
    Case((1, 150, 3, 5), dtype=torch.bfloat16, reduction="sum", weight=True, mode="clamp"),
    Case((8, 1000), dtype=torch.float16),
    Case((6, 67), dtype=torch.bfloat16, reduction="none", sigma=4.0, position_weight=True, label_smoothing=0.1),
]


def make_logits(shape, layout, dtype, gen) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * 4
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    elif layout == "class-sliced":  # a view of every other class of a wider tensor
        x = (torch.randn((shape[0], 2 * shape[1]) + shape[2:], generator=gen) * 4)[:, ::2]
    elif layout == "permuted":  # dense, memory order (N, H, C, W): spatial dims are not one strided run
        x = torch.randn((shape[0], shape[2], shape[1], shape[3]), generator=gen).permute(0, 2, 1, 3) * 4
    elif layout == "cropped":  # a crop of the last spatial dim: spatial dims are not one strided run
        x = (torch.randn(shape[:-1] + (shape[-1] + 3,), generator=gen) * 4)[..., 1 : shape[-1] + 1]
    return x.to(device=DEVICE, dtype=dtype)


@dataclass
class Inputs:
    logits: torch.Tensor
    target: torch.Tensor
    counts: torch.Tensor
    weight: torch.Tensor | None
    position_weight: torch.Tensor | None
    ignore_index: int


def make_inputs(case: Case, gen: torch.Generator) -> Inputs:
    c = case.shape[1]
    ignore_index = 255 if case.target_dtype == torch.uint8 else -100
    target = torch.randint(0, c, case.shape[:1] + case.shape[2:], generator=gen)
    target[torch.rand(target.shape, generator=gen) < case.ignore] = ignore_index
    return Inputs(
        logits=make_logits(case.shape, case.layout, case.dtype, gen),
        target=target.to(device=DEVICE, dtype=case.target_dtype),
        counts=torch.randint(1, 10**7, (c,), generator=gen),
        weight=(torch.rand(c, generator=gen) + 0.5).to(DEVICE) if case.weight else None,
        position_weight=(torch.rand(target.shape, generator=gen) + 0.5).to(DEVICE) if case.position_weight else None,
        ignore_index=ignore_index,
    )


def case_loss(backend: str, case: Case, inputs: Inputs, seed: int, logits: torch.Tensor) -> torch.Tensor:
    """The loss of ``logits`` with the case's options and the rest of ``inputs``."""
    return blv_cross_entropy(
        logits, inputs.target, inputs.weight, class_counts=inputs.counts, sigma=case.sigma, seed=seed, offset=12345,
        mode=case.mode, ignore_index=inputs.ignore_index, reduction=case.reduction,
        label_smoothing=case.label_smoothing, position_weight=inputs.position_weight, backend=backend,
    )  # fmt: skip


def loss_and_grad(backend: str, case: Case, inputs: Inputs, seed: int, grad_out: torch.Tensor, logits=None):
    """The loss of ``inputs`` (or of ``logits`` in their place) and its gradient for ``grad_out``."""
    x = (inputs.logits if logits is None else logits).detach().clone().requires_grad_(True)  # clone keeps the layout
    loss = case_loss(backend, case, inputs, seed, x)
    (grad,) = torch.autograd.grad(loss, x, grad_out.to(loss.dtype))
    return loss, grad


def check_matches_reference(backend: str, case: Case, gen: torch.Generator) -> None:
    """One grid case: a backend's loss and gradient against the reference's (float32), or for half
    dtypes no further from a float64 ground truth than the reference at that precision."""
    inputs = make_inputs(case, gen)
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    loss_shape = inputs.target.shape if case.reduction == "none" else ()
    grad_out = torch.randn(loss_shape, generator=gen).to(DEVICE)

    loss, grad = loss_and_grad(backend, case, inputs, seed, grad_out)
    assert loss.dtype == case.dtype and loss.shape == loss_shape
    assert grad.dtype == case.dtype and grad.shape == inputs.logits.shape
    if case.layout in ("contiguous", "channels_last"):  # the gradient keeps the logits' layout
        assert grad.stride() == inputs.logits.stride()
    reference = loss_and_grad("reference", case, inputs, seed, grad_out)
    # Low precision: the reference computes in float32 and rounds its result to the dtype once; a
    # fused backend may round it the other way (half an ulp of the dtype at the result's scale),
    # and its gradient twice: in the forward, g1 = G/g to within eps/2 |g1| (for a grad_output of
    # 1), and again when the backward scales it by g: |g| eps/2 |g1| = eps/2 |G|, half an ulp at
    # the result's scale whatever |g|, then the second rounding's half. Triton's CPU interpreter
    # truncates fp32 -> bf16 where GPUs round to nearest: a full ulp there.
    truncates = backend == "triton" and DEVICE == "cpu" and case.dtype == torch.bfloat16
    assert_as_close_as_reference(
        case.dtype, (loss, grad), reference,
        lambda: loss_and_grad("reference", case, inputs, seed, grad_out.double(), inputs.logits.double()),
        ulps=1.0 if truncates else 0.5, grad_roundings=1.0 if bool((grad_out == 1).all()) else 2.0,
    )  # fmt: skip


def assert_as_close_as_reference(dtype, ours, reference, ground_truth, *, ulps: float = 0.5,
                                 grad_roundings: float = 1.0) -> None:  # fmt: skip
    """A backend's (loss, gradient) against the reference's: float32 within 1e-5 (relative; the
    gradient 1e-6 absolute); float16 / bfloat16 no further from the float64 ground truth
    (``ground_truth()``: the reference on the logits in float64) than the reference, plus ``ulps``
    of the dtype at the result's scale, once for the loss and ``grad_roundings`` times for the gradient."""
    (loss, grad), (ref_loss, ref_grad) = ours, reference
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
        return
    gt_loss, gt_grad = ground_truth()
    eps = torch.finfo(dtype).eps
    for mine, ref, gt, roundings in [(loss, ref_loss, gt_loss, 1.0), (grad, ref_grad, gt_grad, grad_roundings)]:
        our_err, ref_err = (mine.double() - gt).abs().max(), (ref.double() - gt).abs().max()
        assert our_err <= ref_err + roundings * ulps * eps * gt.abs().max(), (our_err, ref_err)
