"""The host's time per eager call of the fused loss, forward and backward, on this machine's CPU.

    python -m benchmarks.host [--calls N]

Where a batch is small the kernels take less time than the Python around them (argument checks,
the problem's tensors, the launches' arguments, the autograd node), and an eager call costs that
(the H100 ran the 2x19x512x1024 step's kernels in 0.08 ms and the eager call in 1.1 ms). This
times that Python without a GPU: the Triton backend's whole call with its kernel launches
replaced by no-ops (what they write is zero: no bad label; the mean is then NaN, 0 / 0, which
nothing reads), beside the CPU backend's whole call (its C++ kernels, a few microseconds at this
size) and ``F.cross_entropy``'s, on the same 2x19x8x8 batch, back to back in one run. On a GPU, ``benchmarks/loss.py`` reports the
real thing (``host_ms``). The median over rounds, microseconds per forward+backward.
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

from .common import IGNORE_INDEX, SIGMA, at_least, blv_backend_problem, class_counts, environment, log, stamp_line

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


def us_per_call(step, calls: int) -> float:
    """The median over ROUNDS of ``calls`` back-to-back calls, in microseconds a call."""
    for _ in range(max(calls // 10, 1)):
        step()
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        rounds.append((time.perf_counter() - start) * 1e6 / calls)
    return statistics.median(rounds)


def measure(calls: int) -> list[tuple[str, float | None, str]]:
    """(provider, microseconds a call or None, note) for F.cross_entropy and each fused backend."""
    torch.manual_seed(0)
    logits = torch.randn(SHAPE, requires_grad=True)
    target = torch.randint(0, SHAPE[1], SHAPE[:1] + SHAPE[2:])

    def step(loss_fn):
        def run():
            loss_fn(logits, target).backward()
            logits.grad = None

        return run

    rows = [("F.cross_entropy", us_per_call(step(lambda x, t: F.cross_entropy(x, t, ignore_index=IGNORE_INDEX)),
                                            calls), "its whole call")]  # fmt: skip
    counts = class_counts(SHAPE[1])
    problem = blv_backend_problem("cpu", logits.device)
    cpu = BLVLoss(counts, sigma=SIGMA, ignore_index=IGNORE_INDEX, backend="cpu") if problem is None else None
    rows.append(("BLV cpu", cpu and us_per_call(step(cpu), calls), problem or "its whole call, C++ kernels included"))
    try:
        import triton  # noqa: F401
    except ImportError:
        return [*rows, ("BLV triton", None, "triton is not installed")]
    with triton_launches_stubbed():
        fused = BLVLoss(counts, sigma=SIGMA, ignore_index=IGNORE_INDEX, backend="triton")
        rows.append(("BLV triton", us_per_call(step(fused), calls), "its Python, the launches no-ops"))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=at_least(1), default=2000, help="calls a round (default: 2000)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = measure(args.calls)
    reference = rows[0][1]
    log(f"Host time per eager call, forward+backward, {'x'.join(map(str, SHAPE))} fp32 on the CPU, median of "
        f"{ROUNDS} rounds of {args.calls} | {stamp_line(environment(torch.device('cpu')))}")  # fmt: skip
    for provider, us, note in rows:
        time_text = "not run" if us is None else f"{us:8.1f} us  {us / reference:5.2f}x"
        log(f"  {provider:16} {time_text}  ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
