"""The mmengine hook of the sigma schedule."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from blv_kernels import BLVLoss

pytest.importorskip("mmengine", reason="mmengine is not installed")
from mmengine.registry import HOOKS  # noqa: E402

from blv_kernels.integrations.hooks import SigmaScheduleHook  # noqa: E402


def test_registered_and_sets_sigma_before_each_iteration(rng):
    hook = HOOKS.build(dict(type="SigmaScheduleHook", sigma_0=6.0, t_mid=100, t_end=200, shape="cosine"))
    assert isinstance(hook, SigmaScheduleHook)
    counts = torch.randint(1, 1000, (4,), generator=rng).tolist()
    model = nn.ModuleDict({"decode_head": nn.ModuleDict({"loss_decode": BLVLoss(counts)})})
    for it, expected in [(0, 0.0), (50, 3.0), (100, 6.0), (150, 3.0), (250, 0.0)]:
        hook.before_train_iter(SimpleNamespace(model=model, iter=it), batch_idx=it)
        assert model["decode_head"]["loss_decode"].sigma == pytest.approx(expected)


def test_numpy_scalars_in_the_config(rng):
    """Configs computed with numpy (np.float32 sigmas, np.int64 iterations) build the same hook."""
    hook = HOOKS.build(dict(type="SigmaScheduleHook", sigma_0=np.float32(4.0), t_mid=np.int64(10), t_end=np.int64(20)))
    loss = BLVLoss(torch.randint(1, 1000, (3,), generator=rng).tolist())
    hook.before_train_iter(SimpleNamespace(model=loss, iter=15), batch_idx=15)
    assert loss.sigma == pytest.approx(2.0)
