"""mmengine hook for the sigma schedule (mmsegmentation 1.x and any mmengine runner).

Importing this module needs mmengine; it registers ``SigmaScheduleHook`` in mmengine's root
``HOOKS`` registry, which every downstream scope (``mmseg`` included) falls back to. In a
config::

    custom_imports = dict(imports=["blv_kernels.integrations.hooks"], allow_failed_imports=False)
    custom_hooks = [dict(type="SigmaScheduleHook", sigma_0=6.0, t_mid=30000, t_end=40000)]
"""

from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .schedule import SigmaSchedule

__all__ = ["SigmaScheduleHook"]


@HOOKS.register_module()
class SigmaScheduleHook(Hook):
    """Before every training iteration, set ``sigma = schedule(runner.iter)`` on every BLVLoss of the model.

    Takes the arguments of :class:`~blv_kernels.integrations.SigmaSchedule`.
    """

    def __init__(
        self,
        sigma_0: float,
        t_mid: int,
        t_end: int,
        shape: str = "linear",
        sigma_start: float = 0.0,
        sigma_end: float = 0.0,
    ) -> None:
        self.schedule = SigmaSchedule(sigma_0, t_mid, t_end, shape, sigma_start, sigma_end)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self.schedule.step(runner.model, runner.iter)
