"""Online class counts from labels and pseudo-labels, for semi-supervised and domain-adaptive training.

The supplement (section 8) found a prior estimated from the few labeled images too biased
and estimated it with the unlabeled data through pseudo-labels: :class:`ClassCounter`
accumulates both during training and re-weights a :class:`~blv_kernels.BLVLoss` in place.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .._validation import (
    TARGET_DTYPES,
    check_dense,
    check_holds_values,
    check_target_values,
    integer,
    integer_ignore_index,
    real,
)
from ..weights import class_weights
from ._modules import blv_losses
from .dataset_counts import MAX_CLASSES

__all__ = ["ClassCounter"]


class ClassCounter:
    """Running per-class pixel counts; sums over processes under ``torch.distributed``.

    Args:
        num_classes: C.
        ignore_index: label value that is not counted (also when it lies inside ``[0, C)``).
        threshold: a pseudo-label counts only where its softmax confidence is >= this.
        ema_decay: ``None`` sums every update; a value in [0, 1) keeps an exponential moving
            average ``counts = ema_decay * counts + (1 - ema_decay) * batch_counts`` instead
            (the weights depend only on the counts' proportions, so no bias correction).
        smoothing: added to every count when making weights, so classes not seen yet are safe.
        device: where the counts live; the labels' device avoids a copy per update (under
            NCCL it must be a CUDA device).
        group: the process group to sum over (default: the world).

    Numbers may be Python or numpy scalars. Updates are local and need no communication;
    :meth:`counts`, :meth:`weights` and :meth:`apply` are collectives when ``torch.distributed``
    is initialised (every process calls them, after the same number of updates).
    :meth:`state_dict` holds this process's counts, so that a resumed run goes on from them.
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
        self.num_classes = integer("num_classes", num_classes, minimum=1, maximum=MAX_CLASSES)
        self.ignore_index = integer_ignore_index(ignore_index)
        self.threshold = real("threshold (a softmax confidence)", threshold, minimum=0.0, maximum=1.0)
        self.ema_decay = None if ema_decay is None else real("ema_decay", ema_decay, minimum=0.0, below=1.0)
        self.smoothing = real("smoothing", smoothing, minimum=0.0)
        self.group = group
        try:
            # float64 holds integer counts exactly up to 2**53 and the fractional EMA alike
            self._local = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        except (RuntimeError, AssertionError) as err:  # an unknown device, or one this torch cannot use
            raise ValueError(f"device {device!r} cannot hold the counts: {err}") from None
        if self._local.device.type == "meta":
            raise ValueError(f"device {device!r} cannot hold the counts: a meta tensor holds no values")

    @torch.no_grad()
    def update(self, labels: torch.Tensor | np.ndarray) -> None:
        """Add the pixels of a label map (a tensor or numpy array of any shape; ``ignore_index`` is
        skipped, other values outside ``[0, C)`` are an error)."""
        if isinstance(labels, np.ndarray):
            labels = self._from_numpy(labels)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor or a numpy array, got {type(labels).__name__}")
        check_dense("labels", labels)
        if labels.dtype not in TARGET_DTYPES:  # the loss's label dtypes (int64 would wrap uint64's top half around)
            raise TypeError(
                f"labels must hold integer class indices (uint8, int8, int16, int32 or int64), got {labels.dtype}"
            )
        check_holds_values("labels", labels, "labels")
        check_target_values(labels, self.num_classes, self.ignore_index, "labels")
        labels = labels.to(self._local.device).long().flatten()
        self._add(torch.where(labels == self.ignore_index, self.num_classes, labels))

    def _from_numpy(self, labels: np.ndarray) -> torch.Tensor:
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must hold integer class indices, got dtype {labels.dtype}")
        if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
            # int64 (what the counts are indexed with) would wrap it around to a negative label
            raise ValueError(f"labels has value {labels.max()} outside [0, {self.num_classes})")
        # contiguous: torch takes no negative strides (a reversed view)
        return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))

    def _add(self, index: torch.Tensor) -> None:
        """Count the classes in ``index`` (int64 on the counts' device); the value C is a bin for what is not counted."""
        # index_put_ accumulates without a host sync (bincount would sync)
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
        if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
            raise TypeError(f"logits must be a floating-point tensor of shape (N, {self.num_classes}, ...)")
        check_dense("logits", logits)
        if logits.dim() < 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (N, {self.num_classes}, ...), got {tuple(logits.shape)}")
        check_holds_values("logits", logits)
        logits = logits.float()
        top, pseudo = logits.max(dim=1)
        confidence = (top - logits.logsumexp(dim=1)).exp()  # max softmax probability
        # not confident: the bin past the classes, never a class (ignore_index may be one when C > 255)
        index = torch.where(confidence >= self.threshold, pseudo, self.num_classes)
        self._add(index.to(self._local.device).flatten())

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
        losses = blv_losses(module)
        # every loss checked before any is set: a mismatch must not leave the model half re-weighted
        for i, loss in enumerate(losses):
            if loss.variation_weight.shape != counts.shape:
                raise ValueError(
                    f"BLVLoss {i} in the module has {loss.variation_weight.numel()} classes, this counter counts "
                    f"{self.num_classes}: no loss was changed"
                )
        for loss in losses:
            loss.set_class_counts(counts, smoothing=self.smoothing)
        return counts

    def state_dict(self) -> dict:
        """This process's counts (float64, on the CPU): what :meth:`load_state_dict` restores."""
        return {"counts": self._local.cpu().clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore counts saved by :meth:`state_dict` (the same number of classes)."""
        counts = state_dict.get("counts") if isinstance(state_dict, dict) else None
        if not isinstance(counts, torch.Tensor):
            raise ValueError("expected a ClassCounter state dict: {'counts': tensor of shape (C,)}")
        check_dense("the state dict's 'counts'", counts)
        check_holds_values("the state dict's 'counts'", counts, "counts")
        if counts.dtype == torch.bool or counts.dtype.is_complex:  # (a complex one would lose its imaginary part)
            raise TypeError(f"the state dict's 'counts' must hold real numbers, got {counts.dtype}")
        if counts.shape != self._local.shape:
            raise ValueError(
                f"the state dict has counts of shape {tuple(counts.shape)}, this counter counts "
                f"{self.num_classes} classes"
            )
        counts = counts.to(self._local)
        if not (torch.isfinite(counts).all() and (counts >= 0).all()):
            raise ValueError("the state dict's counts must be finite and >= 0")
        self._local.copy_(counts)

    def __repr__(self) -> str:
        return (
            f"ClassCounter(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"threshold={self.threshold}, ema_decay={self.ema_decay}, smoothing={self.smoothing}, "
            f"device={self._local.device}, local_pixels={self._local.sum().item():.6g})"
        )
