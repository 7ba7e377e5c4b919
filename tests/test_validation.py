"""The argument checks every backend shares (blv_kernels/_validation.py): each bad input named in
one line, label checks that raise on the CPU and assert on the device, and the numbers rules."""

import numpy as np
import pytest
import torch

from blv_kernels import _validation as v


def _args(**changes):
    logits = torch.randn(2, 3, 4)
    args = dict(logits=logits, target=torch.randint(0, 3, (2, 4)), variation_weight=torch.rand(3), weight=None,
                position_weight=None, reduction="mean", avg_factor=None)  # fmt: skip
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(logits=[1.0]), TypeError, "must be tensors"),
        (dict(logits=torch.randint(0, 3, (2, 3, 4))), TypeError, "logits must be float"),
        (dict(logits=torch.randn(3)), ValueError, r"shape \(N, C\)"),
        (dict(target=torch.rand(2, 4)), TypeError, "integer class indices"),
        (dict(target=torch.zeros(2, 5, dtype=torch.long)), ValueError, r"target shape \(2, 5\)"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
        (dict(weight=[1.0, 1.0, 1.0]), TypeError, "weight must be a floating-point tensor"),
        (dict(weight=torch.ones(3, requires_grad=True)), ValueError, "weight requires grad"),
        (dict(variation_weight=torch.ones(3, dtype=torch.int64)), TypeError, "variation weight must be"),
        (dict(position_weight=torch.ones(2, 5)), ValueError, "position_weight shape"),
        (dict(position_weight=torch.ones(2, 4, requires_grad=True)), ValueError, "position_weight requires grad"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(reduction="sum", avg_factor=3.0), ValueError, "avg_factor divides"),
        (dict(avg_factor="3"), TypeError, "avg_factor must be a number"),
        (dict(avg_factor=torch.ones(2)), TypeError, "one-element tensor"),
        (dict(avg_factor=torch.tensor(True)), TypeError, r"real numbers, got a torch.bool tensor of shape \(\)"),
        (
            dict(avg_factor=torch.ones(1).to_sparse()),
            TypeError,
            "avg_factor must be a dense .strided. tensor, got a sparse_coo",
        ),
        (
            dict(logits=torch.randn(2, 3, 4).to_sparse()),
            TypeError,
            "logits must be a dense .strided. tensor, got a sparse_coo",
        ),
        (
            dict(target=torch.zeros(2, 4, dtype=torch.long).to_sparse()),
            TypeError,
            "target must be a dense .strided. tensor, got a sparse_coo",
        ),
        (dict(weight=torch.ones(3).to_sparse()), TypeError, "weight must be a dense"),
        (dict(position_weight=torch.ones(2, 4).to_sparse()), TypeError, "position_weight must be a dense"),
        (dict(avg_factor=torch.ones((), requires_grad=True)), ValueError, "avg_factor requires grad"),
        (dict(avg_factor=0), ValueError, r"avg_factor must be a finite number > 0"),
        (dict(avg_factor=-1.0), ValueError, r"avg_factor must be a finite number > 0"),
        (dict(avg_factor=float("nan")), ValueError, r"avg_factor must be a finite number > 0"),
        (dict(avg_factor=np.float64("inf")), ValueError, r"avg_factor must be a finite number > 0"),
        (dict(avg_factor=1e300), ValueError, r"avg_factor must be a finite number > 0 within float32's range"),
        (dict(avg_factor=10**400), ValueError, r"avg_factor must be a finite number > 0 within float32"),
        (dict(avg_factor=1e-50), ValueError, r"avg_factor must be a finite number > 0 within float32"),  # 0 in float32
        # a CPU tensor's value is checked as a number's (it was divided by as it came: a loss of inf, < 0 or 0)
        (dict(avg_factor=torch.tensor(0.0)), ValueError, r"avg_factor must be a finite number > 0 .*, got 0.0"),
        (dict(avg_factor=torch.tensor([-8])), ValueError, r"avg_factor must be a finite number > 0 .*, got -8"),
        (dict(avg_factor=torch.tensor(1e300, dtype=torch.float64)), ValueError, r"float32's range .*, got 1e\+300"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_arguments_are_named(changes, error, match):
    with pytest.raises(error, match=match):
        v.check_loss_arguments(**_args(**changes))


def test_good_arguments_pass():
    v.check_loss_arguments(**_args(weight=torch.ones(3), position_weight=torch.ones(2, 4), avg_factor=torch.tensor(2)))
    v.check_loss_arguments(**_args(avg_factor=np.float32(4.0)))


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(ignore_index=2.5, label_smoothing=0.0), TypeError, "ignore_index must be an int"),
        (dict(ignore_index=True, label_smoothing=0.0), TypeError, "ignore_index must be an int"),
        (dict(ignore_index=2**70, label_smoothing=0.0), ValueError, "fit in int64"),
        (dict(ignore_index=-100, label_smoothing=1.5), ValueError, r"label_smoothing must be a number in \[0, 1\]"),
        (dict(ignore_index=-100, label_smoothing="0.1"), ValueError, "label_smoothing"),
        (dict(ignore_index=-100, label_smoothing=10**400), ValueError, "label_smoothing must be a number in"),
        (dict(ignore_index=-100, label_smoothing=0.0, mode="normal"), ValueError, "mode must be one of"),
        (dict(ignore_index=-100, label_smoothing=0.0, reduction="avg"), ValueError, "reduction must be one of"),
        # None is a value like any other (it once meant "not given": the fused backends then ran mode="abs")
        (dict(ignore_index=-100, label_smoothing=0.0, mode=None), ValueError, "mode must be one of .*, got None"),
        (dict(ignore_index=-100, label_smoothing=0.0, reduction=None), ValueError, "reduction must be one of"),
    ],
)
def test_options(options, error, match):
    with pytest.raises(error, match=match):
        v.check_options(**options)
    v.check_options(ignore_index=np.int64(255), label_smoothing=np.float64(0.25), mode="clamp", reduction="none")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_bad_labels_raise_with_the_first_one_on_the_cpu(dtype, rng):
    target = torch.randint(0, 5, (3, 7), generator=rng)
    v.check_target_values(target.to(dtype), 5, ignore_index=255)  # all good
    target[1, 2], target[2, 6] = 9, 7
    with pytest.raises(ValueError, match=r"2 value\(s\) outside \[0, 5\) that are not ignore_index=255 \(first: 9\)"):
        v.check_target_values(target.to(dtype), 5, ignore_index=255)
    # uint8 compared in int64: 255 - 256 would wrap around otherwise
    assert v.invalid_target_mask(torch.tensor([255, 4, 5]), 5, -100).tolist() == [True, False, True]


def test_real_numbers_beyond_float64_are_out_of_range_not_an_overflow():
    # float(10**400) raises OverflowError: the argument's own ValueError instead, its value abbreviated
    for value in (10**400, -(10**400)):
        with pytest.raises(ValueError, match=r"^loss_weight must be a finite number, got -?1000.*\.\.\..*0$"):
            v.real("loss_weight", value)
    assert v.real("x", np.float32(0.5), minimum=0.0, below=1.0) == 0.5
