"""The host's time per eager call of the fused loss, forward and backward.

    python -m benchmarks.host [--calls N] [--device cpu|cuda] [--threads N]

Where a batch is small the kernels take less time than the Python around them (argument checks,
the problem's tensors, the launches' arguments, the autograd node), and an eager call costs that
(on the H100 an eager step of 2x19x512x1024 took 1.1 ms, where the kernels of a batch four times
as large took 0.32 ms, replayed in a CUDA graph). On the
CPU (default) this times that Python without a GPU: the Triton backend's whole call with its
kernel launches replaced by no-ops (what they write is zero: no bad label; the mean is then NaN,
0 / 0, which nothing reads), beside the CPU backend's whole call (its C++ kernels, a few
microseconds at this size) and ``F.cross_entropy``'s, on the same 2x19x8x8 batch, back to back
in one run. With ``--device cuda`` the same batch on the card: the whole calls of
``F.cross_entropy`` and both fused backends (the device synchronized around each round only: at
this size the host bounds), the Triton backend with its launches stubbed again (on the card, its
three zero-writes are launches too), so that the difference is Triton's launcher, and each call's
device operations (kernels, copies and fills, counted by the profiler). The median over rounds,
microseconds per forward+backward. Torch runs on one CPU thread unless ``--threads`` says more
(the header says how many): at this size its intra-op threads only wait on each other, and on a
busy CPU F.cross_entropy's call took 23.8 ms with the default threads against 19 us with one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from blv_kernels import BLVLoss

from .common import (
    IGNORE_INDEX,
    SIGMA,
    ArgumentParser,
    UsageError,
    add_threads_argument,
    at_least,
    blv_backend_problem,
    class_counts,
    command,
    environment,
    log,
    stamp_line,
    synchronize,
    torch_threads,
)

PROG = "python -m benchmarks.host"

SHAPE = (2, 19, 8, 8)
ROUNDS = 7


@contextlib.contextmanager
def triton_launches_stubbed():
    """The Triton backend on CPU tensors with no kernel run: its launches write zeros instead."""
    from blv_kernels.backends import triton_kernel

    def write_zeros(launch):
        for name in ("weight_sums_ptr", "bad_counts_ptr", "loss_sums_ptr"):
            if name in launch.args:
                launch.args[name].zero_()

    launch, interpret = triton_kernel.Launch.__call__, os.environ.get("TRITON_INTERPRET")
    triton_kernel.Launch.__call__ = write_zeros
    os.environ["TRITON_INTERPRET"] = "1"  # (what lets the backend take CPU tensors; nothing is interpreted)
    try:
        yield
    finally:
        triton_kernel.Launch.__call__ = launch
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def us_per_call(step, calls: int, device: torch.device) -> float:
    """The median over ROUNDS of ``calls`` back-to-back calls, in microseconds a call (the device
    synchronized before and after each round)."""
    for _ in range(max(calls // 10, 1)):
        step()
    rounds = []
    for _ in range(ROUNDS):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        synchronize(device)
        rounds.append((time.perf_counter() - start) * 1e6 / calls)
    return statistics.median(rounds)


def device_operations(step, device: torch.device) -> int | None:
    """The kernels, copies and fills one call of ``step`` puts on a GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        step()
        synchronize(device)
    return sum(event.device_type == DeviceType.CUDA for event in trace.events())


Row = tuple[str, "float | None", "int | None", str]  # (provider, us a call or None, device operations, note)


def measure(calls: int, device: torch.device) -> list[Row]:
    """A row for F.cross_entropy and each fused backend that runs on ``device``, then the Triton
    backend with its launches stubbed."""
    torch.manual_seed(0)
    logits = torch.randn(SHAPE, device=device, requires_grad=True)
    target = torch.randint(0, SHAPE[1], SHAPE[:1] + SHAPE[2:], device=device)

    def step(loss_fn):
        def run():
            loss_fn(logits, target).backward()
            logits.grad = None

        return run

    def row(provider, loss_fn, note):
        run = step(loss_fn)
        return provider, us_per_call(run, calls, device), device_operations(run, device), note

    rows = [row("F.cross_entropy", lambda x, t: F.cross_entropy(x, t, ignore_index=IGNORE_INDEX), "its whole call")]
    counts = class_counts(SHAPE[1])
    compiled = "cpu" if device.type == "cpu" else "cuda"
    problem = blv_backend_problem(compiled, device)
    if problem is None:
        compiled_loss = BLVLoss(counts, sigma=SIGMA, ignore_index=IGNORE_INDEX, backend=compiled).to(device)
        rows.append(row(f"BLV {compiled}", compiled_loss, "its whole call, C++ kernels included"))
    else:
        rows.append((f"BLV {compiled}", None, None, problem))
    try:
        import triton  # noqa: F401
    except ImportError:
        return [*rows, ("BLV triton", None, None, "triton is not installed")]
    fused = BLVLoss(counts, sigma=SIGMA, ignore_index=IGNORE_INDEX, backend="triton").to(device)
    if device.type == "cuda":
        rows.append(row("BLV triton", fused, "its whole call"))
    with triton_launches_stubbed():
        rows.append(row("BLV triton stub", fused, "its Python, the launches no-ops that write zeros"))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=at_least(1), default=2000, help="calls a round (default: 2000)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the batch lives (default: cpu)")
    add_threads_argument(parser, "see above")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here")
    return args


@command(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    with torch_threads(args.threads):
        rows = measure(args.calls, device)
        stamp = stamp_line(environment(device))
    reference = rows[0][1]
    log(f"Host time per eager call, forward+backward, {'x'.join(map(str, SHAPE))} fp32 on {args.device}, median of "
        f"{ROUNDS} rounds of {args.calls} | {stamp}")  # fmt: skip
    for provider, us, operations, note in rows:
        time_text = "not run" if us is None else f"{us:8.1f} us  {us / reference:5.2f}x"
        operations_text = "" if operations is None else f"  {operations:3} device ops"
        log(f"  {provider:16} {time_text}{operations_text}  ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
