"""Known class priors: per-class pixel counts to pass as ``class_counts``.

All lists are in Cityscapes trainId order (:data:`CITYSCAPES_CLASSES`), void excluded.
"""

from __future__ import annotations

__all__ = ["CITYSCAPES_CLASSES", "GTA5_CLASS_COUNTS", "RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO"]

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# GTA5 pixel counts of the 19 Cityscapes classes (the released code's, car corrected: 1259269812).
GTA5_CLASS_COUNTS = (
    16099193283, 4155428633, 8478285320, 925367586, 317481282, 531401266, 67288808, 40463971, 3810296251,
    1074861777, 6784666433, 181828023, 15321782, 1259269812, 564950248, 184638969, 32522117, 15799033, 2718199,
)  # fmt: skip

# ``cls_num_list`` exactly as in the released BLV configs (grantword8/BLV), used there for
# Cityscapes: the GTA5 counts with car's leading digit lost (259269812). Kept only to
# reproduce the released runs; car gets a larger variation weight than its frequency warrants.
RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO = (
    16099193283, 4155428633, 8478285320, 925367586, 317481282, 531401266, 67288808, 40463971, 3810296251,
    1074861777, 6784666433, 181828023, 15321782, 259269812, 564950248, 184638969, 32522117, 15799033, 2718199,
)  # fmt: skip
