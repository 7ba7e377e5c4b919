"""What the benchmarks share: their command lines' errors, the run's stamp, timing, the copy-bandwidth
yardstick, backend probes."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import blv_kernels
from blv_kernels import BLVLoss
from blv_kernels.backends import BACKENDS
from blv_kernels.integrations.known_counts import GTA5_CLASS_COUNTS

REPO_ROOT = Path(__file__).resolve().parents[1]
QUANTILES = (0.5, 0.2, 0.8)  # median, then the 20% and 80% quantiles, as triton.testing.do_bench reports them
SIGMA = 6.0  # the paper's value for most tasks
IGNORE_INDEX = 255
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of a bf16 arithmetic unit: x86's AVX512-BF16 and AMX-BF16, aarch64's FEAT_BF16
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
MAX_THREADS = 4096  # --threads' bound: torch.set_num_threads overflows (a traceback) past int32


class UsageError(Exception):
    """Bad input to a benchmark's command line: one line on stderr, exit status 2, nothing written."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError, so that :func:`command` prints them on one line
    (plain argparse prints its usage first; the usage is one --help away)."""

    def error(self, message: str):
        raise UsageError(message)


def command(prog: str):
    """Decorate a benchmark's ``main(argv) -> exit status``: a UsageError raised in it, by its
    :class:`ArgumentParser` or by a check of its own, is "PROG: error: MESSAGE" on stderr and status 2."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except UsageError as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                return 2

        return run

    return decorate


def class_counts(num_classes: int) -> list[int]:
    """A long-tailed prior: GTA5's Cityscapes counts for 19 classes, a Zipf-like one otherwise."""
    if num_classes == len(GTA5_CLASS_COUNTS):
        return list(GTA5_CLASS_COUNTS)
    return [round(1e9 / (c + 1) ** 1.5) for c in range(num_classes)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: the benchmarks run on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= minimum (and <= maximum)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be an integer <= {maximum}, got {value}")
        return value

    return parse


def budget_seconds(text: str) -> float:
    """An argparse type: a time budget, a finite number of seconds >= 0 (with NaN it never ran out)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def names_in(option: str, text: str, known) -> list[str]:
    """The comma-separated names of ``--option``, each one of ``known`` (so "" is refused, not read as all)."""
    chosen = text.split(",")
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise UsageError(f"--{option}: unknown {unknown}; known: {', '.join(known)}")
    return chosen


def add_threads_argument(parser: argparse.ArgumentParser, why: str) -> None:
    """``--threads N``, torch's CPU threads for the run (:func:`torch_threads`), one by default."""
    parser.add_argument(
        "--threads", type=at_least(1, maximum=MAX_THREADS), default=1, help=f"torch CPU threads (default 1: {why})"
    )


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's CPU threads set to ``count`` for the block only (a test calling ``main`` keeps its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def out_dir_problem(path: Path) -> str | None:
    """None when results can be written to the directory ``path``, else why not (for ``--out``).

    Tried, not guessed from permissions (a read-only file system, ``/proc``, root): the directories
    it lacks are made and a temporary file written, then all is removed again, so that the
    benchmarks can ask before any work and a run refused later leaves nothing behind.
    """
    if path.exists() and not path.is_dir():
        return f"--out {path}: exists and is not a directory"
    missing = [p for p in (path, *path.parents) if not p.exists()]  # the deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        return f"--out {path}: not a writable directory ({error.strerror or error})"
    finally:
        for directory in missing:
            with contextlib.suppress(OSError):  # not made: mkdir failed above it
                directory.rmdir()
    return None


def log(line: str) -> None:
    """Print a progress line now (not when a pipe's buffer fills): a long run shows what it has done."""
    print(line, flush=True)


def cpu_bf16_problem(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """None when this CPU computes bf16 natively, else why bf16 autocast is not worth timing on it.

    Without a bf16 unit every bf16 operation converts to and from fp32 in software: a training
    iteration took seconds (5.6 s on an AVX2-only CPU), which measures the emulation, not BLV.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return f"cannot tell whether this CPU computes bf16 natively ({cpuinfo} is not readable)"
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            flags.update(value.split())
    if flags.intersection(NATIVE_BF16_FLAGS):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"this CPU has no native bf16 (none of {', '.join(NATIVE_BF16_FLAGS)} in {cpuinfo}; torch's CPU "
        f"capability: {capability}): bf16 runs emulated, seconds per iteration"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """The stamp every result file carries: device, torch's CPU threads, versions, commit, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name,
        "device_type": device.type,
        "threads": torch.get_num_threads(),  # on a busy CPU more threads can be slower (host.py, longtail.py)
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "blv_kernels": blv_kernels.__version__,
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def stamp_line(env: dict) -> str:
    commit = (env["commit"] or "unknown")[:10] + ("+changes" if env["uncommitted_changes"] else "")
    # (result files written before the stamp had "threads" lack it)
    threads = f" | {env['threads']} torch thread(s)" if "threads" in env else ""
    return (
        f"{env['device']}{threads} | torch {env['torch']} | triton {env['triton']} | blv_kernels {env['blv_kernels']} "
        f"| commit {commit} | {env['date']}"
    )


def host_loop(fn, *, reps: int, warmup: int, grad_to_none=(), device: torch.device) -> list[float]:
    """Median, 20% and 80% quantiles in ms of ``reps`` timed calls, each ended by a device sync.

    The CPU's stand-in for ``do_bench`` (and the GPU timer of host-bound providers, where a few
    calls of seconds each say all there is to say).
    """
    times = []
    for i in range(warmup + reps):
        for t in grad_to_none:
            t.grad = None
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return quantiles(times)


def host_ms(fn, *, device: torch.device, grad_to_none=(), calls: int = 20) -> float | None:
    """The host's own time per call of ``fn`` on a GPU (None elsewhere): ``calls`` calls back to
    back, synchronized before the first and after the last only, so the launches queue up and the
    host does not wait for the device, unless ``fn`` synchronizes (which then shows). Set beside
    the device-timed median, it says whether a call is host-bound."""
    if device.type != "cuda":
        return None
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        for t in grad_to_none:
            t.grad = None
        fn()
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed * 1e3 / calls


def quantiles(times: list[float]) -> list[float]:
    """The ``QUANTILES`` of ``times`` (median, 20%, 80%)."""
    return torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def bench(fn, *, device: torch.device, grad_to_none=(), reps: int = 10, warmup: int = 2) -> tuple[list[float], str]:
    """Time ``fn``: ``triton.testing.do_bench`` on a GPU, :func:`host_loop` on the CPU. Returns (ms quantiles, timer)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none), quantiles=list(QUANTILES))
        return list(ms), "triton.testing.do_bench"
    return host_loop(fn, reps=reps, warmup=warmup, grad_to_none=grad_to_none, device=device), "host loop"


def peak_extra_memory(fn, device: torch.device, grad_to_none=()) -> int | None:
    """Bytes allocated at the peak of one call of ``fn`` beyond what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    for t in grad_to_none:
        t.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    for t in grad_to_none:
        t.grad = None
    return peak


def copy_bandwidth(device: torch.device, *, reps: int = 10) -> dict:
    """Device-to-device ``copy_`` of a large tensor (read once, written once), timed like the losses."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 23)  # 1 GiB on a GPU, 32 MiB on the CPU
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    (ms, _, _), timer = bench(lambda: dst.copy_(src), device=device, reps=reps)
    num_bytes = 2 * src.numel() * src.element_size()
    return {"bytes": num_bytes, "ms": ms, "gbps": num_bytes / ms / 1e6, "timer": timer}


def blv_backend_problem(backend: str, device: torch.device) -> str | None:
    """None when ``BLVLoss(backend=backend)`` runs forward and backward on ``device``, else why it does not."""
    if backend not in BACKENDS:
        return f"backend={backend!r} is not in this build (blv_kernels.backends.BACKENDS: {', '.join(BACKENDS)})"
    if backend == "triton" and device.type != "cuda":
        return "the fused Triton kernel needs a CUDA device (on the CPU the Triton interpreter is no meaningful timing)"
    error = BACKENDS[backend].why_not(device.type, torch.float32)
    if error is not None:
        return str(error)
    try:
        criterion = BLVLoss(class_counts(5), SIGMA, ignore_index=IGNORE_INDEX, backend=backend).to(device)
        logits = torch.randn(2, 5, 3, 4, device=device, requires_grad=True)
        criterion(logits, torch.randint(0, 5, (2, 3, 4), device=device)).backward()
        synchronize(device)
    except Exception as error:  # any failure of a probe means the backend cannot be timed here: say which
        return f"backend={backend!r} does not run on {device.type}: {type(error).__name__}: {error}"
    return None


def write_json(path: Path, data: dict) -> None:
    """Write atomically, so a run killed by its time limit leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
