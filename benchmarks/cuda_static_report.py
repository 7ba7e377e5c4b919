"""Static instruction count of the CUDA C++ loss pass (csrc/cuda/blv_kernel.cu), on a CPU.

    python -m benchmarks.cuda_static_report

The CUDA counterpart of ``benchmarks/static_report.py`` for the Triton kernels: nvcc compiles the
kernel file for sm_90 (``-lineinfo``), ``benchmarks/sass.py`` walks the loss kernel of one block
and reports thread-instructions per logical element by class, registers and occupancy. **Static
estimates, not measurements.** Assumptions of the walk: sigma = 6 (the polynomial erfinv), the
mean reduction without class or position weights or label smoothing, int64 labels, aligned runs
(the vector accesses, no funnel shifts), every position labelled, and the path of lane 0 of a
lane group, which holds ceil(groups / lanes) groups (at C = 19 the padded class 19 is counted as
if present: a slight upper bound). The kernel's branches are decided by the rules of ``_options``,
keyed by their source lines; a branch or loop the rules do not decide is an error, so a change to
the kernel that the rules do not know fails loudly rather than miscounting. Needs nvcc.
"""

from __future__ import annotations

import argparse
import sys

from blv_kernels.backends import build_csrc

from . import sass
from .common import ArgumentParser, UsageError, command

PROG = "python -m benchmarks.cuda_static_report"

SOURCE = build_csrc.CSRC / "cuda" / "blv_kernel.cu"
MATH = build_csrc.CSRC / "blv_math.h"
CASES = [  # (dtype, pixels contiguous, C, name)
    ("fp32", True, 19, "8x19x512x1024 NCHW fp32"), ("bf16", True, 19, "8x19x512x1024 NCHW bf16"),
    ("fp32", True, 150, "16x150x512x512 NCHW fp32"), ("bf16", True, 150, "16x150x512x512 NCHW bf16"),
    ("fp32", False, 150, "16x150x512x512 channels_last fp32"), ("bf16", False, 150, "16x150x512x512 channels_last bf16"),
]  # fmt: skip


class _Kernels:
    """The compiled kernel file: functions, resources, and its source lines; ``cubin``: an sm_90
    build of it with line info (else it is compiled here)."""

    def __init__(self, cubin: bytes | None = None) -> None:
        if cubin is None:
            cubin = sass.compile_cuda(SOURCE, options=build_csrc.source_flags())
        self.functions = sass.disassemble(cubin)
        self.usage = sass.resource_usage(cubin)
        self.lines = SOURCE.read_text().splitlines()

    def kernel(self, dtype: str, pixel: bool, stream: bool = False) -> str:
        t = {"fp32": "f", "fp16": "6__half", "bf16": "13__nv_bfloat16"}[dtype]
        key = f"loss_kernelI{t}Lb{int(pixel)}ELb{int(stream)}E"
        return next(k for k in self.functions if key in k)


PHILOX = tuple(sass.cpp_function_lines(MATH, f) for f in ("mul_wide", "philox4x32_10", "philox_words"))


def L(text, where=SOURCE):
    return (str(where), sass.line_of(where, text))


def _options(k: _Kernels, lanes: int, groups: int):
    """(branch decisions, loop trips, default deciders) of lane 0's path: see the module docstring."""
    LINES = k.lines

    def Ls(text):
        return [(str(SOURCE), i + 1) for i, line in enumerate(LINES) if text in line]

    T, N, B = sass.Decision.TAKEN, sass.Decision.NOT_TAKEN, sass.Decision.BOTH
    R, S = sass.runs, sass.skips

    def nothing(branch):  # the side that runs nothing (a skipped body)
        taken, not_taken = branch.region(True), branch.region(False)
        return T if len(taken) < len(not_taken) else N

    something = sass.other_side(nothing)  # the side that runs code
    # the side that loads a 64-bit label; the side with the 8- or 16-byte access of a run
    int64_labels = sass.side_with(lambda i: i.opcode.startswith("LDG.E.64"), "a 64-bit load")
    vector_side = sass.side_with(
        lambda i: i.base in ("LDG", "STG") and (".64" in i.opcode or ".128" in i.opcode), "a vector access"
    )
    rules = [
        ("if (k < a.items) {", R(L("it.s0 = (k - it.n * a.per_image) * P;"))),
        ("if (a.x_aligned)", S(L("funnel<R::kWords>(w, shift);"))),  # aligned rows: no funnel
        ("if (shift != 0) {", S(L("funnel<R::kWords>(w, shift);"))),  # w, cw: aligned
        (
            "if (a.dx_aligned)",
            S(L("const uint32_t a = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) / sizeof(T))")),
        ),
        (
            "if (nz.kind != kNoVariation) {",
            R(L("load_class_values(pr.variation_weight, g, static_cast<int>(pr.C), w);")),
        ),
        ("if (nz.kind == kPolyErfinv)", R(L("p = p * x + -0.39945346117019653f;", MATH))),  # sigma 6: erfinv_poly
        ("if (4 * g + kRun <= C)", S(L("load_strided(v + 4 * g, 1, C - 4 * g, 0.0f, out);"))),
        ("if (a.loss_per_position != nullptr) {", S(L("store_run(out, loss);"))),  # "mean": no loss per position
        ("if (lane == 0) warp_sums[warp] = v;", B),
        ("if (warp == 0) {", B),
        ("if (threadIdx.x == 0)", B),
        # the guard of a lanes_max / lanes_sum loop, inlined at its caller: skipped with one lane
        ("= lanes_max(", T if lanes == 1 else N),
        ("= lanes_sum(", T if lanes == 1 else N),
        ("if (smooth", nothing),  # no label smoothing
        ("const float cw_t = !valid ? 0.0f : pr.class_weight", nothing),  # no class weights
        ("const float pw = pr.position_weight != nullptr", nothing),  # no position weights
        ("? pr.position_weight[it.n * pr.stride_wn", nothing),
        ("    if (valid) {", something),  # a labelled position
        ("if (!leader) return 0.0f;", nothing),
        ("const float denom = a.denom != nullptr", something),  # "mean": the divisor is read
        ("    if (p < it.count) {", R(L("const int64_t t = load_label(pr.target, pr.target_dtype, it.n"))),
        (L("if (dtype >= BLV_INT32)", MATH), int64_labels),
        (L("return dtype == BLV_INT64 ?", MATH), int64_labels),
        ("if (runs)", vector_side),
        ("if (pr.stride_xc == 1 && 4 * g + kRun <= pr.C)", vector_side),
        ("if (a.stride_gc == 1 && 4 * g + kRun <= pr.C)", vector_side),
        ("if (a.grad != nullptr) {", R(L("store_group<true, T, PIXEL, P>(pr, a, it, g, v);"))),
    ]
    # the unrolled group loops of the resident row: lane 0 holds ceil(G/L) = J groups in the cases
    # reported, so every body runs, but the smoothing one (no label smoothing)
    for line in Ls("if (4 * g + k < C) {"):  # every class of lane 0's groups is real: an upper bound at C = 19
        rules.append((line, sass.runs((line[0], line[1] + 1))))
    held = -(-groups // lanes)  # the groups lane 0 holds: the first `held` unrolled copies run

    seen: dict[int, list[int]] = {}  # source line -> the unrolled copies of its guard met so far

    def first_held(branch):
        key = branch.instruction.locations[0].line
        seen.setdefault(key, []).append(branch.instruction.address)
        return something(branch) if len(seen[key]) <= held else nothing(branch)

    for line in Ls("if (g < groups"):
        smoothing = "float cw[kRun];" in LINES[line[1]]
        rules.append((line, nothing if smoothing else first_held))
    # a lanes_max / lanes_sum loop's guard, wherever attributed: the side with its shuffle runs with L > 1
    shuffle_lines = {key[1] for key in Ls("__shfl_xor_sync(kFullMask, v, o)")}  # in lanes_max, lanes_sum
    shuffles = sass.side_with(
        lambda i: (
            i.base == "SHFL"
            and any(loc.line in shuffle_lines and loc.file.endswith("blv_kernel.cu") for loc in i.locations)
        ),
        "a lanes_max / lanes_sum shuffle",
    )
    lanes_loop = sass.other_side(shuffles) if lanes == 1 else shuffles

    branches = {}
    for text, decision in rules:
        if isinstance(text, tuple):
            branches[text] = decision
            continue
        keys = Ls(text)
        assert keys, text
        for key in keys:
            branches[key] = decision
    trips = {key: lanes.bit_length() - 1 for key in Ls("for (int o = 1; o < lanes; o <<= 1)")}
    return branches, trips, [lanes_loop, sass.convergent]


def lanes_for(pixel: bool, num_classes: int) -> int:
    """The lane group size the launcher gives: the smallest power of two holding the row (5 groups
    of four classes per lane for pixel-contiguous logits, 8 for class-contiguous ones)."""
    groups, per_lane, lanes = -(-num_classes // 4), 5 if pixel else 8, 1
    while lanes < 32 and lanes * per_lane < groups:
        lanes *= 2
    return lanes


def case_report(k: _Kernels, dtype: str, pixel: bool, num_classes: int) -> tuple[int, sass.KernelReport]:
    lanes = lanes_for(pixel, num_classes)
    branches, trips, defaults = _options(k, lanes, -(-num_classes // 4))
    name = k.kernel(dtype, pixel)
    walk = sass.walk(k.functions, name, trips=trips, branches=branches, default=[*defaults, sass.skip_slow_paths])
    elements = (128 // lanes) * (4 if pixel else 1) * num_classes  # a block's items x positions per item x C
    return lanes, sass.report(walk, num_warps=4, elements=elements, resources=k.usage[name], philox=PHILOX)


@command(PROG)
def main(argv=None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)  # only --help: anything else is refused
    if sass.find_tool("nvcc") is None:
        raise UsageError("nvcc not found (the CUDA toolkit's compiler)")
    kernels = _Kernels()
    print("Static estimate (sm_90 SASS, no GPU): CUDA C++ loss pass (loss and gradient), sigma 6, mean, int64 labels")
    for dtype, pixel, num_classes, name in CASES:
        lanes, report = case_report(kernels, dtype, pixel, num_classes)
        classes = ", ".join(f"{c} {v:.1f}" for c, v in report.per_element.items() if v >= 0.05)
        print(
            f"{name}: {lanes} lane(s): {report.total:.1f} thread-instructions per element ({classes}); "
            f"{report.registers} registers, {report.spill_bytes} B spilled, {report.occupancy.blocks} blocks per SM"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
