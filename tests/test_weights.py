import math

import numpy as np
import pytest
import torch

from blv_kernels import class_weights
from blv_kernels.weights import class_weight_tensor


def test_formula_on_random_counts(rng):
    counts = torch.randint(1, 10**9, (19,), generator=rng, dtype=torch.int64)
    n = counts.double()
    f = math.log(n.sum()) - n.log()
    expected = (f / f.max()).float()
    torch.testing.assert_close(class_weights(counts), expected)
    w = class_weights(counts)
    assert w.dtype == torch.float32 and w.shape == (19,)
    assert w[counts.argmin()] == 1.0 and w.min() == w[counts.argmax()]


@pytest.mark.parametrize("kind", ["list", "numpy", "tensor", "float-tensor"])
def test_accepts_lists_arrays_tensors(kind, rng):
    counts = torch.randint(1, 1000, (7,), generator=rng).tolist()
    converted = {
        "list": counts,
        "numpy": np.asarray(counts),
        "tensor": torch.tensor(counts),
        "float-tensor": torch.tensor(counts, dtype=torch.float32),
    }[kind]
    torch.testing.assert_close(class_weights(converted), class_weights(counts))


def test_zero_count_rejected_unless_smoothing():
    with pytest.raises(ValueError, match=r"zero count for class\(es\) \[1\].*smoothing"):
        class_weights([10, 0, 5])
    w = class_weights([10, 0, 5], smoothing=1.0)
    assert torch.isfinite(w).all() and w[1] == 1.0


def test_smoothing_is_added_to_every_count():
    # [100, 3, 50] + 2 = [102, 5, 52], sum 159: f_c = log(159 / n_c), the rarest (5) gets 1. A
    # smoothing that only raised counts below it (clamp) would leave [100, 3, 50]: 0.108, 1, 0.284.
    w = class_weights([100, 3, 50], smoothing=2.0)
    f = [math.log(159 / n) for n in (102, 5, 52)]
    torch.testing.assert_close(w, torch.tensor([f[0] / f[1], 1.0, f[2] / f[1]]))


@pytest.mark.parametrize("counts, expected", [([42], [0.0]), ([7, 7, 7, 7], [1.0] * 4)], ids=["one-class", "uniform"])
def test_degenerate_priors(counts, expected):
    # One class: f = 0, so w = 0 (no variation), never 0 / 0. Uniform: every f_c = log C > 0 is the
    # maximum, every class the rarest: w = 1 exactly.
    assert torch.equal(class_weights(counts), torch.tensor(expected))


@pytest.mark.parametrize(
    "counts, error, match",
    [
        ([1, -2, 3], ValueError, "non-negative, class 1"),
        ([1, float("inf")], ValueError, "finite"),
        ([1, float("nan")], ValueError, "finite"),
        ([], ValueError, "non-empty"),
        ([[1, 2], [3, 4]], ValueError, "1-D"),
        ("abc", TypeError, "class_counts"),
        (["a", "b"], TypeError, "numbers"),
        ([10**400, 1], TypeError, "within float64's range"),
        ([True, 3], TypeError, "not booleans"),
        (torch.tensor([True, True]), TypeError, "real numbers, got a torch.bool tensor"),
        (np.array([True, True]), TypeError, "real numbers, got a numpy bool array"),
        (torch.tensor([1 + 1j, 2]), TypeError, "real numbers, got a torch.complex64 tensor"),
        (np.array([1 + 1j, 2]), TypeError, "real numbers, got a numpy complex128 array"),
        (np.array([1, 2], dtype="datetime64[D]"), TypeError, "real numbers, got a numpy datetime64"),  # (taken)
        (torch.ones(5, device="meta"), ValueError, "class_counts is a meta tensor: it holds no counts"),
        (torch.ones(5).to_sparse(), TypeError, "class_counts must be a dense .strided. tensor, got a sparse_coo one"),
    ],
    ids=[
        "negative",
        "inf",
        "nan",
        "empty",
        "2d",
        "string",
        "non-numeric",
        "huge",
        "bool-list",
        "bool-tensor",
        "bool-array",
        "complex-tensor",
        "complex-array",
        "datetime-array",
        "meta-tensor",
        "sparse-tensor",
    ],
)
def test_bad_counts(counts, error, match):
    with pytest.raises(error, match=match):
        class_weights(counts)


def test_bad_smoothing():
    with pytest.raises(ValueError, match="smoothing"):
        class_weights([1, 2], smoothing=-1.0)
    with pytest.raises(ValueError, match="^smoothing must be a finite number >= 0.0, got 1000"):
        class_weights([1, 2], smoothing=10**400)  # (float() of it overflowed: an OverflowError)
    # counts + smoothing beyond float64 (inf): every weight came out 0, no variation at all
    with pytest.raises(ValueError, match=r"^class_counts \+ smoothing must be finite in float64, got \[inf"):
        class_weights([1e308, 1.0], smoothing=1e308)


@pytest.mark.parametrize(
    "weight, error, match",
    [
        ([True, False, True], TypeError, "weight must be numbers, not booleans"),
        (np.array([True, False, True]), TypeError, "weight must be real numbers, got a bool array"),
        (torch.tensor([True, False, True]), TypeError, "weight must be real numbers, got a torch.bool tensor"),
        (torch.ones(3, dtype=torch.complex64), TypeError, "weight must be real numbers, got a torch.complex64 tensor"),
        (torch.ones(3).to_sparse(), TypeError, "weight must be a dense .strided. tensor, got a sparse_coo one"),
        (torch.ones(3, device="meta"), ValueError, "weight is a meta tensor: it holds no values"),
        (torch.ones(3, requires_grad=True), ValueError, "weight requires grad"),
        ({"road": 1.0}, TypeError, "weight must be a tensor or a list of numbers, one per class, got {'road'"),
        ([[1.0, 2.0]], ValueError, r"weight must be a 1-D list of numbers, one per class, got shape \(1, 2\)"),
        ([1.0, 10**400, 1.0], ValueError, "weight must be finite in float32"),
        ([1.0, 1e300, 1.0], ValueError, r"weight must be finite in float32, got \[1.0, inf"),
        (torch.tensor([1.0, float("nan")]), ValueError, "weight must be finite in float32"),
    ],
    ids=["bools", "bool-array", "bool-tensor", "complex", "sparse", "meta", "requires-grad", "dict", "2d", "huge-int",
         "beyond-float32", "nan"],
)  # fmt: skip
def test_bad_class_weights_are_named(weight, error, match):
    with pytest.raises(error, match=f"^{match}"):
        class_weight_tensor(weight)


def test_class_weights_of_every_kind_become_float32():
    for given in (
        [1, 2, 3],
        (0.5, 1.5, 2.5),
        np.array([1, 2, 3], dtype=np.int16),
        torch.tensor([1.0, 2.0, 3.0]).double(),
    ):
        weight = class_weight_tensor(given, "class_weight")
        assert weight.dtype == torch.float32 and weight.tolist() == [float(w) for w in given]


def test_counts_near_the_float64_maximum():
    # the sum of the counts overflows float64; the weights are formed in log space
    w = class_weights([1e308, 1e308, 1.0])
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, class_weights([1.0, 1.0, 1e-308]))
    assert w[2] == 1 and w[0] == w[1] > 0


def test_weights_compile_from_a_list():
    counts = [16, 4, 1, 8]
    compiled = torch.compile(lambda: class_weights(counts), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(), class_weights(counts))
