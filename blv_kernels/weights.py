"""Class prior -> BLV variation weights.

The paper's frequency term (Eq. 3): for per-class pixel counts ``n_c``

    f_c = log(sum_k n_k) - log(n_c)      # = -log p_c >= 0, large for rare classes
    w_c = f_c / max_k f_k                # in [0, 1]; the rarest class gets 1

and every logit of class ``c`` is shifted by ``v * w_c`` during training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["class_weights"]


def _counts_as_float64(class_counts) -> torch.Tensor:
    """Lists, numpy arrays and tensors -> a 1-D float64 CPU tensor, validated."""
    if isinstance(class_counts, torch.Tensor):
        counts = class_counts.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(class_counts, (Sequence, np.ndarray)) and not isinstance(class_counts, (str, bytes)):
        try:
            counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"class_counts must be numbers, got {class_counts!r}") from err
    else:
        raise TypeError(
            f"class_counts must be a list, numpy array or tensor of per-class counts, got {type(class_counts).__name__}"
        )
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if not torch.isfinite(counts).all():
        raise ValueError(f"class_counts must be finite, got {counts.tolist()}")
    if (counts < 0).any():
        bad = int(torch.nonzero(counts < 0)[0])
        raise ValueError(f"class_counts must be non-negative, class {bad} has count {counts[bad].item()}")
    return counts


def class_weights(class_counts, *, smoothing: float = 0.0) -> torch.Tensor:
    """Per-class variation weights ``w_c = f_c / max f`` with ``f_c = log(sum n) - log(n_c)``.

    Args:
        class_counts: per-class pixel (or sample) counts ``n_c``, length C; a list, numpy
            array or tensor.
        smoothing: added to every count first (additive smoothing). A count of 0 makes
            ``f_c`` infinite, so zero counts are rejected unless ``smoothing > 0``.

    Returns:
        A float32 CPU tensor of shape (C,) with values in [0, 1]. One class, or counts
        that give every class the same frequency term 0, yield all zeros (no variation).
    """
    if not (isinstance(smoothing, (int, float)) and math.isfinite(smoothing) and smoothing >= 0):
        raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
    counts = _counts_as_float64(class_counts) + smoothing
    zero = torch.nonzero(counts == 0).flatten().tolist()
    if zero:
        raise ValueError(
            f"class_counts has zero count for class(es) {zero}: log(0) makes their weight infinite; "
            "pass smoothing > 0 (for example smoothing=1.0) or fix the counts"
        )
    # f_c >= 0 in exact arithmetic; clamp the rounding of log(total) - log(n_c) at 0.
    freq = (counts.sum().log() - counts.log()).clamp_min(0.0)
    fmax = freq.max()
    if fmax <= 0:  # one class, or a prior that gives every class f_c = 0: no variation
        return torch.zeros_like(freq, dtype=torch.float32)
    return (freq / fmax).to(torch.float32)
