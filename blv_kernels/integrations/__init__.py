"""Training integration: sigma schedule, class counts (offline and online), known priors.

The mmsegmentation adapter (:mod:`blv_kernels.integrations.mmseg`) and the mmengine hook
(:mod:`blv_kernels.integrations.hooks`) are imported on their own, so that nothing here
needs mmseg or mmengine.
"""

from .dataset_counts import (
    CountResult,
    count_classes,
    count_label_files,
    find_label_files,
    load_counts,
    read_label,
    save_counts,
)
from .known_counts import CITYSCAPES_CLASSES, GTA5_CLASS_COUNTS, RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO
from .online_counts import ClassCounter
from .schedule import SigmaSchedule

__all__ = [
    "SigmaSchedule",
    "ClassCounter",
    "count_classes",
    "count_label_files",
    "find_label_files",
    "CountResult",
    "read_label",
    "load_counts",
    "save_counts",
    "CITYSCAPES_CLASSES",
    "GTA5_CLASS_COUNTS",
    "RELEASED_CONFIG_COUNTS_WITH_CAR_TYPO",
]
