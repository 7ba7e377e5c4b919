"""Known class priors: the corrected GTA5 counts and the released configs' list with its typo."""

import torch

from blv_kernels import BLVLoss, class_weights
from blv_kernels.integrations import CITYSCAPES_CLASSES, GTA5_CLASS_COUNTS, RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO


def test_lengths_and_the_one_difference():
    assert len(CITYSCAPES_CLASSES) == len(GTA5_CLASS_COUNTS) == len(RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO) == 19
    differ = [i for i, (a, b) in enumerate(zip(GTA5_CLASS_COUNTS, RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO, strict=True))
              if a != b]  # fmt: skip
    assert differ == [CITYSCAPES_CLASSES.index("car")]
    car = differ[0]
    assert GTA5_CLASS_COUNTS[car] == 1259269812
    assert str(RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO[car]) == str(GTA5_CLASS_COUNTS[car])[1:]  # leading digit lost


def test_typo_inflates_the_car_weight():
    car = CITYSCAPES_CLASSES.index("car")
    right, typo = class_weights(GTA5_CLASS_COUNTS), class_weights(RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO)
    assert typo[car] > right[car] + 0.05
    assert right.argmin() == CITYSCAPES_CLASSES.index("road") and right.argmax() == CITYSCAPES_CLASSES.index("bicycle")


def test_usable_as_class_counts():
    torch.testing.assert_close(BLVLoss(GTA5_CLASS_COUNTS).variation_weight, class_weights(GTA5_CLASS_COUNTS))
