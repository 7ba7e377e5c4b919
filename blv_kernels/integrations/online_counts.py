"""Online class counts from labels and pseudo-labels, for semi-supervised and domain-adaptive training.

The supplement (section 8) found a prior estimated from the few labeled images too biased
and estimated it with the unlabeled data through pseudo-labels: :class:`ClassCounter`
accumulates both during training and re-weights a :class:`~blv_kernels.BLVLoss` in place.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .._validation import check_target_values
from ..weights import class_weights
from ._modules import blv_losses

__all__ = ["ClassCounter"]


class ClassCounter:
    """Running per-class pixel counts; sums over processes under ``torch.distributed``.

    Args:
        num_classes: C.
        ignore_index: label value that is not counted.
        threshold: a pseudo-label counts only where its softmax confidence is >= this.
        ema_decay: ``None`` sums every update; a value in [0, 1) keeps an exponential moving
            average ``counts = ema_decay * counts + (1 - ema_decay) * batch_counts`` instead
            (the weights depend only on the counts' proportions, so no bias correction).
        smoothing: added to every count when making weights, so classes not seen yet are safe.
        device: where the counts live; the labels' device avoids a copy per update (under
            NCCL it must be a CUDA device).
        group: the process group to sum over (default: the world).

    Updates are local and need no communication; :meth:`counts`, :meth:`weights` and
    :meth:`apply` are collectives when ``torch.distributed`` is initialised (every process
    calls them, after the same number of updates).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        threshold: float = 0.0,
        ema_decay: float | None = None,
        smoothing: float = 1.0,
        device: torch.device | str | None = None,
        group=None,
    ) -> None:
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a softmax confidence in [0, 1], got {threshold!r}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay!r}")
        if not (math.isfinite(smoothing) and smoothing >= 0):
            raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.threshold = threshold
        self.ema_decay = ema_decay
        self.smoothing = smoothing
        self.group = group
        # float64 holds integer counts exactly up to 2**53 and the fractional EMA alike
        self._local = torch.zeros(num_classes, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, labels: torch.Tensor) -> None:
        """Add the pixels of a label map (any shape; ``ignore_index`` is skipped, other out-of-range values are an error)."""
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must hold integer class indices, got {labels.dtype}")
        check_target_values(labels, self.num_classes, self.ignore_index)
        labels = labels.to(self._local.device).long().flatten()
        # ignored pixels go to an extra bin C; index_put_ accumulates without a host sync (bincount would sync)
        index = torch.where(labels == self.ignore_index, self.num_classes, labels)
        batch = torch.zeros(self.num_classes + 1, dtype=torch.int64, device=index.device)
        batch.index_put_((index,), torch.ones((), dtype=torch.int64, device=index.device), accumulate=True)
        batch = batch[: self.num_classes].double()
        if self.ema_decay is None:
            self._local += batch
        else:
            self._local.mul_(self.ema_decay).add_(batch, alpha=1.0 - self.ema_decay)

    @torch.no_grad()
    def update_from_logits(self, logits: torch.Tensor) -> None:
        """Add pseudo-labels: the argmax class of ``logits`` (N, C, ...) where its softmax confidence >= threshold."""
        if logits.dim() < 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (N, {self.num_classes}, ...), got {tuple(logits.shape)}")
        logits = logits.float()
        top, pseudo = logits.max(dim=1)
        confidence = (top - logits.logsumexp(dim=1)).exp()  # max softmax probability
        self.update(torch.where(confidence >= self.threshold, pseudo, self.ignore_index))

    def counts(self) -> torch.Tensor:
        """The counts summed over all processes (float64, on the counter's device). A collective."""
        total = self._local.clone()  # the all-reduce must leave the local counts as they are
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total, group=self.group)
        return total

    def weights(self) -> torch.Tensor:
        """``class_weights(counts(), smoothing=smoothing)``. A collective."""
        return class_weights(self.counts(), smoothing=self.smoothing)

    def apply(self, module: nn.Module) -> torch.Tensor:
        """Set the counts on every BLVLoss in ``module`` (``set_class_counts``); returns the counts. A collective."""
        counts = self.counts()
        for loss in blv_losses(module):
            loss.set_class_counts(counts, smoothing=self.smoothing)
        return counts
