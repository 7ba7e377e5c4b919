"""blv_kernels: the Balancing Logit Variation (BLV) loss as a fast, exact training loss.

BLV (CVPR 2023) adds to every logit, during training only, a random positive shift
``v * w_c`` (``v = min(|N(0, sigma^2)|, 1)``, ``w_c`` growing with the rarity of class c)
and takes softmax cross-entropy.
"""

from .loss import BLVLoss, blv_cross_entropy, blv_cross_entropy_from_weights
from .noise import variation
from .weights import class_weights

__all__ = ["BLVLoss", "blv_cross_entropy", "blv_cross_entropy_from_weights", "class_weights", "variation"]
__version__ = "0.1.0"
