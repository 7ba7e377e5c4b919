"""Known class priors: the corrected GTA5 counts and the released configs' list with its typo."""

import math

import torch

from blv_kernels import BLVLoss, class_weights
from blv_kernels.integrations import CITYSCAPES_CLASSES, GTA5_CLASS_COUNTS, RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO

# BLV_SPEC.md section 7, copied by hand: GTA5 pixel counts of the 19 Cityscapes classes in trainId order
SPEC_GTA5_COUNTS = (
    16099193283, 4155428633, 8478285320, 925367586, 317481282, 531401266, 67288808, 40463971, 3810296251,
    1074861777, 6784666433, 181828023, 15321782, 1259269812, 564950248, 184638969, 32522117, 15799033, 2718199,
)  # fmt: skip
# Cityscapes trainIds 0..18
TRAIN_ID_ORDER = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip


def test_counts_are_the_spec_s_entry_by_entry():
    # a literal copy, not derived from the module: a drift in any entry, of either list, fails
    assert CITYSCAPES_CLASSES == TRAIN_ID_ORDER
    assert GTA5_CLASS_COUNTS == SPEC_GTA5_COUNTS
    car = TRAIN_ID_ORDER.index("car")
    typo = SPEC_GTA5_COUNTS[:car] + (259269812,) + SPEC_GTA5_COUNTS[car + 1 :]  # the released configs' car
    assert RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO == typo
    assert str(typo[car]) == str(SPEC_GTA5_COUNTS[car])[1:]  # leading digit lost


def test_typo_inflates_the_car_weight():
    car = CITYSCAPES_CLASSES.index("car")
    right, typo = class_weights(GTA5_CLASS_COUNTS), class_weights(RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO)
    assert typo[car] > right[car] + 0.05
    assert right.argmin() == CITYSCAPES_CLASSES.index("road") and right.argmax() == CITYSCAPES_CLASSES.index("bicycle")


def test_usable_as_class_counts():
    # w_c = f_c / max f, f_c = log(sum n) - log(n_c) (BLV_SPEC.md section 2), by hand in float64
    # from the spec's counts: BLVLoss's float32 weights to within their rounding
    f = [math.log(sum(SPEC_GTA5_COUNTS)) - math.log(n) for n in SPEC_GTA5_COUNTS]
    expected = torch.tensor([f_c / max(f) for f_c in f], dtype=torch.float64)
    weights = BLVLoss(GTA5_CLASS_COUNTS).variation_weight
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), expected, rtol=1e-7, atol=0)  # float32: 6e-8
