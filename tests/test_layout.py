"""The layout rule every fused backend shares (blv_kernels/_layout.py): which views are read in
place through (N, [C,] S) strides, which are copied, the gradient's buffer, and its cache."""

import math
from types import SimpleNamespace

import pytest
import torch

from blv_kernels._layout import as_ncs, empty_gradient, ncs_tensors, spatial_stride


@pytest.mark.parametrize(
    "shape, strides, expected",
    [
        ((4, 5), (5, 1), 1),  # contiguous H, W: one run of stride 1
        ((4, 5), (1, 4), None),  # transposed: W outer of H is not one run
        ((4, 5), (10, 2), 2),  # every other element: one run of stride 2
        ((4, 1, 5), (5, 99, 1), 1),  # size-1 dims do not count, whatever their stride
        ((3, 4), (0, 0), 0),  # an expanded scalar: one run of stride 0
        ((), (), 1),  # no spatial dims: (N, C) rows
        ((4, 5), (7, 1), None),  # a crop of W: rows 7 apart, 5 long
    ],
)
def test_spatial_stride(shape, strides, expected):
    assert spatial_stride(shape, strides) == expected


def _same(view, addressed):
    """The addressed tensor, read as (N, C, S) through the strides as_ncs gives, holds the view's values."""
    t, strides = addressed
    n, c, s = view.shape[0], view.shape[1], math.prod(view.shape[2:])
    assert torch.equal(torch.as_strided(t, (n, c, s), strides), view.reshape(n, c, s))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "class-sliced", "batch-sliced", "rows"])
def test_read_in_place(layout, rng):
    x = torch.randn(4, 6, 5, 7, generator=rng)
    view = {
        "contiguous": x,
        "channels_last": x.to(memory_format=torch.channels_last),
        "class-sliced": torch.randn(4, 12, 5, 7, generator=rng)[:, ::2],
        "batch-sliced": torch.randn(8, 6, 5, 7, generator=rng)[::2],
        "rows": x[:, :, 0, 0],
    }[layout]
    t, strides = as_ncs(view, 2)
    assert t.data_ptr() == view.data_ptr()  # no copy
    _same(view, (t, strides))


@pytest.mark.parametrize("layout", ["cropped", "permuted"])
def test_copied_when_the_positions_are_not_one_run(layout, rng):
    x = torch.randn(4, 6, 5, 9, generator=rng)
    view = x[..., 1:8] if layout == "cropped" else torch.randn(4, 5, 6, 7, generator=rng).permute(0, 2, 1, 3)
    t, strides = as_ncs(view, 2)
    assert t.data_ptr() != view.data_ptr() and t.is_contiguous()
    _same(view, (t, strides))


def test_labels_and_expanded_grad_outputs(rng):
    labels = torch.randint(0, 5, (3, 4, 6), generator=rng)
    t, strides = as_ncs(labels, 1)
    assert strides == (24, 1) and t.data_ptr() == labels.data_ptr()
    expanded = torch.randn((), generator=rng).expand(3, 4, 6)
    t, strides = as_ncs(expanded, 1)
    assert strides == (0, 0) and t.data_ptr() == expanded.data_ptr()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_gradient_buffer_keeps_an_addressable_layout(layout, rng):
    x = torch.randn(2, 6, 5, 7, generator=rng)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = torch.randn(2, 5, 6, 7, generator=rng).permute(0, 2, 1, 3)
    grad = empty_gradient(x)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    if layout == "permuted":  # not one run of positions: contiguous instead
        assert grad.is_contiguous()
    else:
        assert grad.stride() == x.stride()
    assert spatial_stride(grad.shape[2:], grad.stride()[2:]) is not None


@pytest.mark.parametrize(
    "layout",
    [
        "contiguous",
        "channels_last",
        "class-sliced",
        "rows",
        "cropped",
        "permuted",
        "expanded",
        "empty",
        "empty-cropped",
    ],
)
@pytest.mark.parametrize("target_layout", ["contiguous", "reversed"])
@pytest.mark.parametrize("with_weight", [False, True], ids=["", "position-weight"])
@pytest.mark.parametrize("compute_grad", [False, True], ids=["", "grad"])
def test_cached_layout_is_the_tensors_own(layout, target_layout, with_weight, compute_grad, rng):
    # ncs_tensors reads the layout of each shape and strides from a cache computed on meta tensors:
    # the copies, strides and gradient buffer must be those of the real tensors' rule
    x = torch.randn(3, 6, 5, 9, generator=rng)
    logits = {
        "contiguous": x,
        "channels_last": x.to(memory_format=torch.channels_last),
        "class-sliced": torch.randn(3, 12, 5, 9, generator=rng)[:, ::2],
        "rows": x[:, :, 0, 0],
        "cropped": x[..., 1:8],
        "permuted": torch.randn(3, 5, 6, 9, generator=rng).permute(0, 2, 1, 3),
        "expanded": torch.randn(1, 6, 1, 1, generator=rng).expand(3, 6, 5, 9),
        "empty": x[:, :, :0],
        "empty-cropped": x[:, :, :0, ::2],  # no strided run, and .contiguous() keeps it
    }[layout]
    target_shape = logits.shape[:1] + logits.shape[2:]
    target = torch.randint(0, 6, target_shape, generator=rng)
    if target_layout == "reversed":  # the spatial dims no strided run: copied
        target = torch.randint(0, 6, target_shape[::-1], generator=rng).permute(*range(len(target_shape))[::-1])
    weight = torch.rand(target_shape, generator=rng).mT if with_weight and target.dim() > 1 else None
    problem = SimpleNamespace(logits=logits, target=target, position_weight=weight)
    t = ncs_tensors(problem, compute_grad=compute_grad)
    expected = {}
    for key, tensor, lead in (("x", logits, 2), ("t", target, 1), ("w", weight, 1)):
        addressed, strides = (None, (0,) * (lead + 1)) if tensor is None else as_ncs(tensor, lead)
        dims = "ncs" if lead == 2 else "ns"
        expected |= {f"stride_{key}{d}": stride for d, stride in zip(dims, strides, strict=True)}
        got = {"x": t.logits, "t": t.target, "w": t.position_weight}[key]
        if tensor is not None:
            assert (got.data_ptr() == tensor.data_ptr()) == (addressed.data_ptr() == tensor.data_ptr())
            assert got.stride() == addressed.stride() and torch.equal(got, tensor)
    if not compute_grad:
        assert t.grad is None and t.strides == expected | {"stride_gn": 0, "stride_gc": 0, "stride_gs": 0}
        return
    grad = empty_gradient(logits)
    assert (t.grad.shape, t.grad.dtype) == (grad.shape, grad.dtype)
    if logits.numel():  # (no elements: any strides do, and meta's empty_like gives other ones than the CPU's)
        assert t.grad.stride() == grad.stride()
        assert t.strides == expected | dict(
            zip(("stride_gn", "stride_gc", "stride_gs"), as_ncs(grad, 2)[1], strict=True)
        )
