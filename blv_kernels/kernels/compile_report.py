"""Compile the fused kernels ahead of time for a GPU target and report their registers and spills.

No GPU is needed (Triton compiles to a cubin itself, and its package carries cuobjdump), so
CI checks on a CPU machine that every kernel specialisation the launchers can ask for
compiles for the target, how many registers it takes and whether it spills to local memory
(register pressure rules this kernel's speed):

    python -m blv_kernels.kernels.compile_report [--arch 90] [--json]

Cases: every (BLOCK_P, BLOCK_G) that ``block_sizes`` gives for C in [1, 8192], fp32 and bf16
logits, pixels contiguous (NCHW: the spatial stride is 1) or classes contiguous
(channels_last, (N, C) rows: the class stride is 1), forward and backward, with every optional
input present. Pointers are taken as 16-byte aligned, as the JIT sees torch's allocations.
Must run without TRITON_INTERPRET (the interpreter gives no compilable kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from . import blv_cross_entropy as k

_POINTERS = {
    "x_ptr": "*{dtype}", "target_ptr": "*u8", "var_w_ptr": "*fp32", "cls_w_ptr": "*fp32", "pos_w_ptr": "*fp32",
    "seed_ptr": "*i64", "sigma_ptr": "*i64", "loss_ptr": "*{dtype}", "lse_ptr": "*fp32", "partial_ptr": "*fp32",
    "bad_ptr": "*i32", "grad_loss_ptr": "*fp32", "denom_ptr": "*fp32", "dx_ptr": "*{dtype}",
}  # fmt: skip
_I64 = ("P", "offset")  # may exceed 2**31; the rest of the integers are i32 at realistic sizes
# the stride a layout makes 1 (the JIT specialises an integer argument equal to 1 as a constant)
_UNIT_STRIDES = {
    "pixels-contiguous": ("stride_xs", "stride_ts", "stride_ws", "stride_ds"),
    "classes-contiguous": ("stride_xc", "stride_dc"),
}
_FLAGS = {
    "fwd": dict(HAS_CLASS_WEIGHT=True, HAS_POS_WEIGHT=True, STORE_LOSS=True),
    "bwd": dict(HAS_CLASS_WEIGHT=True, HAS_POS_WEIGHT=True, IS_MEAN=True),
}
_KERNELS = {"fwd": k._blv_ce_fwd_kernel, "bwd": k._blv_ce_bwd_kernel}


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def compile_case(kernel: str, block: tuple[int, int], dtype: str, layout: str, arch: int) -> dict:
    """Compile one specialisation; returns its registers and local-memory bytes (spills)."""
    fn = _KERNELS[kernel]
    block_p, block_g = block
    constexprs = dict(BLOCK_P=block_p, BLOCK_G=block_g, CLAMP_MODE=False, **_FLAGS[kernel])
    constexprs.update({name: 1 for name in _UNIT_STRIDES[layout] if name in fn.arg_names})
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = _POINTERS[name].format(dtype=dtype)
        else:
            signature[name] = "i64" if name in _I64 else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in _POINTERS}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    # e.g. "REG:136 STACK:0 SHARED:1024 LOCAL:0 ...": spilled registers live in STACK/LOCAL
    resources = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {
        "kernel": kernel, "block_p": block_p, "block_g": block_g, "dtype": dtype, "layout": layout,
        "arch": f"sm_{arch}", "registers": int(resources["REG"]),
        "spill_bytes": int(resources["STACK"]) + int(resources["LOCAL"]),
    }  # fmt: skip


def cases(arch: int):
    blocks = sorted({k.block_sizes(c) for c in range(1, 8193)})
    for block in blocks:
        for dtype in ("fp32", "bf16"):
            for layout in _UNIT_STRIDES:
                for kernel in _KERNELS:
                    yield kernel, block, dtype, layout, arch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90 (default 90)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    if _cuobjdump() is None:
        parser.error("no cuobjdump found (Triton's bundled one or on PATH)")
    rows = [compile_case(*case) for case in cases(args.arch)]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'kernel':6} {'BLOCK_P x G':>11} {'dtype':5} {'layout':18} {'arch':6} {'regs':>4} {'spill B':>7}")
        for r in rows:
            block = f"{r['block_p']}x{r['block_g']}"
            print(f"{r['kernel']:6} {block:>11} {r['dtype']:5} {r['layout']:18} {r['arch']:6} "
                  f"{r['registers']:4d} {r['spill_bytes']:7d}")  # fmt: skip
    return 1 if any(r["spill_bytes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
