"""The compiled C++ backends, ``"cpu"`` and ``"cuda"``: ``csrc/`` through its C interface.

``csrc/blv_kernel.h`` declares the kernels as plain C functions over raw pointers and element
strides; each device type has its own shared library implementing them (``csrc/cpu``,
``csrc/cuda``), built by ``build_csrc`` on first use (or by ``setup.py``) and called here
through ctypes. So there is no second op schema and no torch C++ extension to build against
torch's headers: the op, its fake and its autograd are those of ``blv_kernels/ops.py``, and
this module only lays a :class:`~blv_kernels.problem.BLVProblem` out for the C side.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from .._layout import ncs_tensors
from ..problem import BLVProblem, check_labels, mean_divisor, reduced_loss
from .build_csrc import LIBRARIES, Library, library_path

__all__ = ["CompiledKernels", "forward", "scale_grad_", "unavailable"]

FLOAT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # BlvFloatType
INT_TYPES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}  # BlvIntType
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}  # BlvReduction


class BlvProblem(ctypes.Structure):
    """``BlvProblem`` of csrc/blv_kernel.h, field for field."""

    _fields_ = [
        ("logits", ctypes.c_void_p), ("target", ctypes.c_void_p), ("variation_weight", ctypes.c_void_p),
        ("class_weight", ctypes.c_void_p), ("position_weight", ctypes.c_void_p), ("seed", ctypes.c_void_p),
        ("variation_params", ctypes.c_void_p),
        ("N", ctypes.c_int64), ("C", ctypes.c_int64), ("S", ctypes.c_int64), ("offset", ctypes.c_int64),
        ("ignore_index", ctypes.c_int64),
        ("stride_xn", ctypes.c_int64), ("stride_xc", ctypes.c_int64), ("stride_xs", ctypes.c_int64),
        ("stride_tn", ctypes.c_int64), ("stride_ts", ctypes.c_int64),
        ("stride_wn", ctypes.c_int64), ("stride_ws", ctypes.c_int64),
        ("logits_dtype", ctypes.c_int32), ("target_dtype", ctypes.c_int32), ("reduction", ctypes.c_int32),
        ("clamp_mode", ctypes.c_int32), ("loss_dtype", ctypes.c_int32), ("label_smoothing", ctypes.c_float),
    ]  # fmt: skip


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CompiledKernels:
    """The kernels of one shared library, on the device of the tensors they are given."""

    def __init__(self, path: Path, name: str) -> None:
        self.name = name  # what errors call these kernels ("cpu", "cuda", ...)
        lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
        problem, void, i32, i64 = ctypes.POINTER(BlvProblem), ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        for function_name, args, result in [
            ("blv_label_blocks", [problem], i64),
            ("blv_label_pass", [problem, void, void, void, ctypes.c_int], ctypes.c_int),
            ("blv_loss_blocks", [problem], i64),
            ("blv_loss_pass", [problem, void, void, void, void, i64, i64, i64, void, ctypes.c_int], ctypes.c_int),
            ("blv_scale_grad", [void, i32, i64, void, void, ctypes.c_int], ctypes.c_int),
            ("blv_error_string", [ctypes.c_int], ctypes.c_char_p),
        ]:
            function = getattr(lib, function_name)
            function.argtypes, function.restype = args, result
        self.lib = lib

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"blv_kernels {self.name} kernels, {what}: {self.lib.blv_error_string(code).decode()}")

    def _launch(self, device: torch.device) -> tuple[int | None, int, AbstractContextManager]:
        """(stream, threads, the device made current): the current CUDA stream, or the CPU's intra-op
        thread count."""
        if device.type == "cuda":
            return torch.cuda.current_stream(device).cuda_stream, 0, torch.cuda.device(device)
        return None, torch.get_num_threads(), nullcontext()

    def forward(self, problem: BLVProblem, *, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The operator contract's forward: (loss, its gradient for grad_output 1, or an empty tensor)."""
        t = ncs_tensors(problem, compute_grad=compute_grad)
        logits, target, grad, s = t.logits, t.target, t.grad, t.strides
        batch, positions = logits.shape[0], problem.positions
        c_problem = BlvProblem(
            _pointer(logits), _pointer(target), _pointer(problem.variation_weight), _pointer(problem.class_weight),
            _pointer(t.position_weight), _pointer(problem.seed), _pointer(problem.variation_params),
            batch, problem.num_classes, positions // batch if batch else 0, problem.offset, problem.ignore_index,
            s["stride_xn"], s["stride_xc"], s["stride_xs"], s["stride_tn"], s["stride_ts"], s["stride_wn"],
            s["stride_ws"], FLOAT_TYPES[logits.dtype], INT_TYPES[target.dtype], REDUCTIONS[problem.reduction],
            problem.mode == "clamp", FLOAT_TYPES[problem.loss_dtype], problem.label_smoothing,
        )  # fmt: skip
        device = logits.device
        stream, threads, current = self._launch(device)
        f32 = dict(dtype=torch.float32, device=device)
        with current:
            label_blocks = self.lib.blv_label_blocks(c_problem)
            weight_sums = torch.empty(label_blocks, **f32)
            bad_counts = torch.empty(label_blocks, dtype=torch.int32, device=device)
            self._check(self.lib.blv_label_pass(c_problem, _pointer(weight_sums), _pointer(bad_counts), stream,
                                                threads), "label pass")  # fmt: skip
            check_labels(problem, bad_counts)
            denom = mean_divisor(problem, weight_sums)
            loss_sums = torch.empty(self.lib.blv_loss_blocks(c_problem), **f32)
            per_position = (
                torch.empty(target.shape, dtype=problem.loss_dtype, device=device)
                if problem.reduction == "none"
                else None
            )
            self._check(self.lib.blv_loss_pass(c_problem, _pointer(denom), _pointer(per_position), _pointer(loss_sums),
                                               _pointer(grad), s["stride_gn"], s["stride_gc"], s["stride_gs"], stream,
                                               threads), "loss pass")  # fmt: skip
        loss = reduced_loss(problem, loss_sums, denom, per_position)
        return loss, grad if grad is not None else logits.new_empty(0)

    def scale_grad_(self, grad: torch.Tensor, grad_output: torch.Tensor) -> None:
        """grad *= grad_output (a one-element float32 tensor), in place; nothing happens when it is exactly 1."""
        stream, threads, current = self._launch(grad.device)
        with current:
            code = self.lib.blv_scale_grad(_pointer(grad), FLOAT_TYPES[grad.dtype], grad.numel(),
                                           _pointer(grad_output.reshape(())), stream, threads)  # fmt: skip
        self._check(code, "gradient scaling")


_loaded: dict[str, CompiledKernels | str] = {}  # device type -> its kernels, or why they are unavailable
_lock = threading.Lock()


def kernels(device_type: str) -> CompiledKernels:
    found = _load(device_type)
    if isinstance(found, str):
        raise RuntimeError(found)
    return found


def _load(device_type: str) -> CompiledKernels | str:
    with _lock:
        if device_type not in _loaded:
            _loaded[device_type] = _build_and_load(LIBRARIES[device_type], device_type)
        return _loaded[device_type]


def _build_and_load(library: Library, device_type: str) -> CompiledKernels | str:
    if device_type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
        return f"backend='cuda' needs a CUDA build of torch (this is torch {torch.__version__})"
    try:
        return CompiledKernels(library_path(library), device_type)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        # no compiler, a failed or timed-out build, or a library that does not load
        return f"backend={device_type!r}: the compiled {device_type} kernels are unavailable: {err}"


def unavailable(device_type: str) -> str | None:
    """Why the compiled kernels for ``device_type`` cannot run here (building them on first call), or None."""
    found = _load(device_type)
    return found if isinstance(found, str) else None


def forward(problem: BLVProblem, *, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels(problem.logits.device.type).forward(problem, compute_grad=compute_grad)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    kernels(grad.device.type).scale_grad_(grad, grad_output)
