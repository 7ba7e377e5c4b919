"""Static speed measurement of GPU kernels from their sm_90 SASS, on a CPU: no GPU needed.

A kernel's speed is estimated from the instructions one program (CTA) executes:

1. ``disassemble`` runs nvdisasm (``-c -gi``) on a cubin: every function, kernel or subroutine,
   becomes a list of ``Instruction`` (address, predicate guard, opcode with modifiers, operands,
   source-location chain innermost first). The ``BRA``-to-itself and ``NOP`` padding after the
   last ``EXIT``/``RET`` of a function is dropped: it is never executed.
2. ``ControlFlowGraph`` splits a function into basic blocks, finds the natural loops (back edges
   to a dominating header, nested) and the conditional regions of the other branches (the blocks
   each side runs before the join, the immediate post-dominator).
3. ``walk`` follows the path of one warp through the kernel and counts how often each
   instruction executes. The caller decides everything the SASS cannot tell:

   - loops: ``trips`` maps a source line of the loop (e.g. the line of its ``for``, which its
     compare-and-branch instructions are attributed to) to its trip count, the iterations of the
     source loop (times its body runs) per entry, whether ptxas tests at the bottom (do-while),
     at the top (while: the test runs once more than the body) or exits the kernel from inside
     (``@P0 EXIT`` on the loop's line). A loop no key matches is an error (``UnknownLoop``)
     naming the loop's lines. The branch that skips a loop when it has no trip (the guard in
     front of a rotated loop) is decided from the trip count when it is attributed to the same
     line. ptxas unrolls small loops on its own (a main loop that does k trips per iteration,
     then remainder branches): the remainder branches are then undecided and the error says so;
     pass a callable trip count (a function of the ``Loop``) and decide those branches with a
     decider that looks at ``branch.instruction.address``.
   - every other conditional branch (``@P0 BRA``, ``@P0 EXIT``, ``BRA.DIV``): ``branches`` maps a
     source line of the branch instruction to a ``Decision`` (``TAKEN``: the branch jumps, or the
     warp exits; ``NOT_TAKEN``; ``BOTH``: a divergent branch, the warp runs both sides one after
     the other) or to a decider, a function of the ``Branch`` such as ``runs(line)``: "the side
     holding this source line runs". ``default`` deciders handle what ``branches`` does not;
     none are applied unless named: ``both_sides`` (every branch divergent, an upper bound),
     ``skip_slow_paths`` (the side without a call to a runtime subroutine such as
     ``__internal_..._div_s64``), ``convergent`` (``BRA.DIV`` not taken). A branch nobody decides
     is an error (``UndecidedBranch``) naming its address and source lines.
   - calls (``CALL.REL``/``CALL.ABS`` to a subroutine in the cubin): the callee's instructions on
     the path it takes are counted, its own branches decided in the same way.

   Decisions are static: a branch is decided once for every iteration and call site, a loop
   has one trip count for every entry (no triangular loops); a loop whose trip count differs
   between the lanes of a warp takes the largest (the warp runs until its last lane is done).
   Refused with an error: indirect branches (BRX, JMX), irreducible loops, predicated calls,
   a divergent (``BOTH``) branch whose side leaves or restarts its loop.

4. ``classify`` puts each instruction in one class of ``CLASSES``: "philox" (integer instructions
   of the Philox implementation, found by source location at any inlining level: Triton's
   ``philox``/``philox_impl`` by default, or caller-given ``SourceRange``; Philox's key schedule,
   the same for every lane, runs on the uniform datapath and stays "uniform"), "fp32" (FADD, FMUL,
   FFMA, FMNMX, FSEL, FSETP, FCHK, and the packed half ops HADD2/HMUL2/HFMA2, which run on the
   same FMA pipe; in fp32 kernels ``HFMA2.MMA Rd, -RZ, RZ, a, b`` is how ptxas materialises a
   constant), "fp64" (DADD, DMUL, DFMA, DSETP: not in the report's list, kept apart because an
   H100 SM runs them at half the fp32 rate), "mufu", "int", "convert", "memory", "sync",
   "uniform" (the U* opcodes of the uniform datapath, except the UTMA*/UBLK* copies, which are
   memory), "other" (moves, branches, special registers).

What is counted: every warp instruction on the path, predicated on or off (a predicated-off
lane still issues), times 32 threads, times the warps of a program; all warps of a program are
assumed to take the same path (``@P0 EXIT`` that lets one warp through for a final store is
counted as that warp's path for all of them). Uniform instructions are issued per warp like the
others and counted, in their own class. ``thread instructions per element`` divides by the
logical elements a program covers (positions x real classes, never the padded ones).

The throughput model (``predict``): time = max(thread instructions / (issue rate x efficiency),
bytes / copy bandwidth) with the H100 constants below; the issue rate is one warp instruction per
SMSP per clock, the most Hopper issues (no dual issue). What it cannot see: stalls on memory
latency or dependencies, which the efficiency factor lumps together with everything else and
which differ between kernels; the per-pipe limits (MUFU gives 16 results per SM per clock, fp64
and the integer multiply-add 64, against 128 for FFMA, so a kernel heavy on one pipe is slower
than its instruction count says); bank conflicts, cache misses, tail effects of the grid,
launch overhead; the memory floor assumes a perfect copy-rate stream. Occupancy
(``blocks_per_sm``) is reported beside the count, not folded into it.
"""

from __future__ import annotations

import ast
import enum
import functools
import inspect
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# Tools and compilation


def find_tool(name: str) -> str | None:
    """A CUDA tool (nvdisasm, cuobjdump, ptxas, nvcc): the one Triton bundles first, then the
    toolkit's (``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, as ``build_csrc`` finds nvcc), then PATH."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    homes = [os.environ.get(variable) for variable in ("CUDA_HOME", "CUDA_PATH")]
    return next((str(Path(h, "bin", name)) for h in homes if h and Path(h, "bin", name).is_file()), shutil.which(name))


def _require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found (neither bundled with Triton nor on PATH)")
    return path


@dataclass(frozen=True)
class CompiledKernel:
    """A Triton kernel compiled for a GPU target: what a launch needs to know about it."""

    name: str
    cubin: bytes
    num_warps: int
    shared: int  # dynamic shared memory the launch asks for, bytes
    ttgir: str = ""  # Triton's GPU IR, with the layouts of its tensors


def compile_triton(
    fn, signature: Mapping[str, str], constexprs: Mapping[str, object] | None = None, *, num_warps: int = 4,
    num_stages: int = 3, maxnreg: int | None = None, arch: int = 90, attrs: Mapping | None = None,
) -> CompiledKernel:  # fmt: skip
    """Compile a ``@triton.jit`` function for ``sm_<arch>`` without a GPU.

    ``signature`` types the runtime arguments (``{"x_ptr": "*fp32", "n": "i32"}``); arguments
    in ``constexprs`` are typed ``constexpr`` here. FMA fusion is on, as on a GPU by default;
    ``num_stages`` and ``maxnreg`` are the launch options of those names (Triton's default of 3
    stages software-pipelines loops; ``maxnreg`` caps ptxas' registers).
    Needs TRITON_INTERPRET unset when ``fn`` was decorated (the interpreter compiles nothing).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{fn} is not a compilable JITFunction: was it decorated under TRITON_INTERPRET=1?")
    constexprs = dict(constexprs or {})
    full_signature = {name: "constexpr" if name in constexprs else signature[name] for name in fn.arg_names}
    source = triton.compiler.ASTSource(fn=fn, signature=full_signature, constexprs=constexprs, attrs=dict(attrs or {}))
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    meta = compiled.metadata
    return CompiledKernel(meta.name, compiled.asm["cubin"], meta.num_warps, meta.shared, compiled.asm["ttgir"])


def compile_cuda(path: Path | str, *, arch: int = 90, options: Sequence[str] = ()) -> bytes:
    """Compile a CUDA C++ file to an ``sm_<arch>`` cubin with line info (nvcc -cubin -lineinfo)."""
    nvcc = _require_tool("nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "kernel.cubin")
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-lineinfo", *options, "-o", str(out), str(path)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return out.read_bytes()


def line_of(where, text: str) -> int:
    """The line number of the one line holding ``text``, in a file (a path) or in the source of a
    function (a ``@triton.jit`` function, or a plain one): source lines move, snippets less so."""
    if isinstance(where, (str, Path)):
        lines, first = Path(where).read_text().splitlines(), 1
    else:
        lines, first = inspect.getsourcelines(getattr(where, "fn", where))
    hits = [first + i for i, line in enumerate(lines) if text in line]
    if len(hits) != 1:
        raise ValueError(f"{text!r} is on {len(hits)} lines of {where} ({hits}), not one")
    return hits[0]


# ----------------------------------------------------------------------------------------------
# Disassembly


@dataclass(frozen=True)
class Location:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{Path(self.file).name}:{self.line}"


@dataclass(frozen=True)
class Instruction:
    function: str
    address: int
    guard: str | None  # "@P0", "@!UP1"; None when unpredicated
    opcode: str  # with modifiers: "IMAD.WIDE.U32"
    operands: str
    locations: tuple[Location, ...]  # innermost first, then the lines it was inlined at
    target: str | None  # the label in `(...)`: branch or call target, BSSY's reconvergence point

    @property
    def base(self) -> str:
        """The opcode without modifiers: "IMAD" for "IMAD.WIDE.U32"."""
        return self.opcode.split(".")[0]

    @property
    def predicated(self) -> bool:
        return self.guard is not None and self.guard != "@PT"

    @property
    def text(self) -> str:
        """As nvdisasm prints it, without the address: "@!P0 BRA `(.L_x_0)"."""
        return " ".join(part for part in (self.guard, self.opcode, self.operands) if part)

    def __str__(self) -> str:
        return f"/*{self.address:04x}*/ {self.text}"


@dataclass
class Function:
    name: str
    entry: bool  # a kernel (STO_CUDA_ENTRY), not a subroutine
    instructions: list[Instruction]
    labels: dict[str, int]  # the labels of its section -> address

    def __repr__(self) -> str:
        return f"Function({self.name}, {len(self.instructions)} instructions)"


_SECTION = re.compile(r"^//-+ \.text\.\S+\s+-+$")
_SYMBOLS = re.compile(r"^//-+ SYMBOLS")
_TYPE = re.compile(r"^\s*\.type\s+(?P<name>[^,\s]+),@function")
_ENTRY = re.compile(r'^\s*\.other\s+(?P<name>[^,\s]+),@"STO_CUDA_ENTRY')
_LABEL = re.compile(r"^(?P<label>[^\s/][^\s]*):\s*$")
_LOCATION = re.compile(r'^\s*//## File "(?P<file>[^"]+)", line (?P<line>\d+)')
_INSTRUCTION = re.compile(r"^\s*/\*(?P<address>[0-9a-f]+)\*/\s+(?P<text>.*?)\s*;?\s*$")
_TEXT = re.compile(r"^(?:(?P<guard>@!?U?P(?:[0-7]|T))\s+)?(?P<opcode>[A-Z0-9_.]+)\s*(?P<operands>.*?)\s*;?$")
_TARGET = re.compile(r"`\((?P<label>[^)]+)\)")


def disassemble(cubin: bytes) -> dict[str, Function]:
    """Every function of a cubin (kernels and subroutines), by name, from ``nvdisasm -c -gi``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        result = subprocess.run(
            [_require_tool("nvdisasm"), "-c", "-gi", str(path)], capture_output=True, text=True, check=True
        )
    return parse_sass(result.stdout)


def parse_sass(text: str) -> dict[str, Function]:
    """Parse the output of ``nvdisasm -c -gi`` (branch targets appear as labels by default)."""
    functions: dict[str, Function] = {}
    declared: set[str] = set()  # names `.type NAME,@function` announced: their label starts a function
    entries: set[str] = set()
    in_code = False  # inside a .text section, before the SYMBOLS table
    labels: dict[str, int] = {}
    pending_labels: list[str] = []
    current: Function | None = None
    chain: list[Location] = []
    in_chain = False  # consecutive location lines form one chain, innermost first
    for line in text.splitlines():
        if m := _LOCATION.match(line):
            if not in_chain:
                chain = []
            chain.append(Location(m["file"], int(m["line"])))
            in_chain = True
            continue
        in_chain = False
        if _SECTION.match(line):
            in_code, labels, current, chain = True, {}, None, []
        elif _SYMBOLS.match(line):
            in_code, current = False, None
        elif m := _TYPE.match(line):
            declared.add(m["name"])
        elif m := _ENTRY.match(line):
            entries.add(m["name"])
        elif in_code and (m := _LABEL.match(line)):
            label = m["label"]
            if label in declared:
                current = functions[label] = Function(label, False, [], labels)
                chain = []  # a subroutine's code carries no line info of its own
            pending_labels.append(label)
        elif current is not None and (m := _INSTRUCTION.match(line)):
            address = int(m["address"], 16)
            for label in pending_labels:
                labels[label] = address
            pending_labels = []
            parts = _TEXT.match(m["text"])
            if parts is None:
                raise ValueError(f"unparsed SASS line: {line!r}")
            target = _TARGET.search(parts["operands"])
            current.instructions.append(
                Instruction(
                    current.name, address, parts["guard"], parts["opcode"], parts["operands"], tuple(chain),
                    target["label"] if target else None,
                )
            )  # fmt: skip
    for name, function in functions.items():
        function.entry = name in entries
        _strip_padding(function)
    return functions


def _strip_padding(function: Function) -> None:
    """Drop the trailing ``BRA`` to itself and ``NOP`` fill that align a section's end."""
    instructions = function.instructions
    while instructions and (instructions[-1].opcode == "NOP" or _is_self_loop(instructions[-1], function.labels)):
        instructions.pop()


def _is_self_loop(instruction: Instruction, labels: Mapping[str, int]) -> bool:
    return (
        instruction.opcode == "BRA"
        and not instruction.predicated
        and labels.get(instruction.target or "") == instruction.address
    )


# ----------------------------------------------------------------------------------------------
# Control flow: blocks, loops, branch regions

_INDIRECT = {"BRX", "BRXU", "JMX", "JMXU", "JMP"}


def _is_branch(instruction: Instruction) -> bool:
    return instruction.base == "BRA"


def _ends_block(instruction: Instruction) -> bool:
    return instruction.base in {"BRA", "EXIT", "RET", *_INDIRECT}


def _is_conditional(instruction: Instruction) -> bool:
    """Guarded (``@P0 BRA``), or a predicate operand (``BRA.U !UP0, ...``), or ``BRA.DIV``."""
    if instruction.predicated:
        return True
    first_operand = instruction.operands.split(",")[0].strip()
    return instruction.opcode.startswith("BRA.DIV") or bool(re.fullmatch(r"!?U?P[0-6]", first_operand))


@dataclass(eq=False)
class Block:
    function: str
    instructions: tuple[Instruction, ...]
    jump: Block | None = None  # where the terminating BRA goes
    next: Block | None = None  # fall-through successor
    leaves: bool = False  # ends with EXIT or RET
    conditional: bool = False  # its terminator may or may not transfer

    @property
    def start(self) -> int:
        return self.instructions[0].address

    @property
    def terminator(self) -> Instruction:
        return self.instructions[-1]

    @property
    def successors(self) -> list[Block]:
        return [b for b in (self.jump, self.next) if b is not None]

    def __repr__(self) -> str:
        return f"Block({self.function}@{self.start:#06x}, {len(self.instructions)} instructions)"


@dataclass(eq=False)
class Loop:
    header: Block
    blocks: frozenset[Block]
    latches: tuple[Block, ...]  # blocks with the back edge to the header
    control: tuple[Instruction, ...]  # the branches that close or leave it: what its source lines are read from
    parent: Loop | None = None

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    @property
    def size(self) -> int:
        """Static instructions in the loop, nested loops included."""
        return sum(len(b.instructions) for b in self.blocks)

    def describe(self) -> str:
        end = max(b.instructions[-1].address for b in self.blocks)
        lines = sorted({_chain_text(i.locations) for i in self.control})
        return f"loop {self.header.start:#06x}-{end:#06x} in {self.header.function} (control at {'; '.join(lines)})"


@dataclass(eq=False)
class Branch:
    """A conditional branch that is not a loop's own latch or exit: a caller decides it."""

    block: Block
    taken: Block | None  # None: the taken side leaves the function (EXIT, RET)
    not_taken: Block
    join: Block | None  # immediate post-dominator; None: the function's exit
    taken_region: frozenset[Block]  # the blocks only the taken side runs before the join
    not_taken_region: frozenset[Block]

    @property
    def instruction(self) -> Instruction:
        return self.block.terminator

    @property
    def kind(self) -> str:
        return "if-else" if self.taken_region and self.not_taken_region else "if"

    def region(self, taken: bool) -> frozenset[Block]:
        return self.taken_region if taken else self.not_taken_region

    def region_locations(self, taken: bool) -> set[Location]:
        """Every source location (all inlining levels) of the code one side runs."""
        return {loc for b in self.region(taken) for i in b.instructions for loc in i.locations}

    def describe(self) -> str:
        def side(taken):
            instructions = [i for b in self.region(taken) for i in b.instructions]
            if not instructions:
                return "exits" if taken and self.taken is None else "nothing"
            lines = _lines_text(i.locations[0] for i in instructions if i.locations)
            return lines or f"{len(instructions)} instructions without line info"

        ins = self.instruction
        return (
            f"branch at {ins.address:#06x} in {ins.function} ({ins.text}), "
            f"at {_chain_text(ins.locations)}; taken runs {side(True)}; not taken runs {side(False)}"
        )


class ControlFlowGraph:
    """Basic blocks of one function (those reachable from its entry), loops and branch regions."""

    def __init__(self, function: Function):
        self.function = function
        blocks = _split_blocks(function)
        self.entry = blocks[0]
        order = _reverse_postorder(self.entry)  # the reachable blocks
        predecessors: dict[Block, list[Block]] = {b: [] for b in order}
        for b in order:
            for s in b.successors:
                predecessors[s].append(b)
        self.dominators = _dominators(order, predecessors)
        self.blocks = [b for b in blocks if b in self.dominators]  # the reachable ones, in address order
        self.loops = _natural_loops(self.blocks, self.dominators, order, predecessors)
        self.latch_of = {latch: loop for loop in self.loops for latch in loop.latches}
        self.loops_at = {b: [loop for loop in self.loops if loop.header is b] for b in self.blocks}
        self._back_edges = {(latch, loop.header) for loop in self.loops for latch in loop.latches}
        self.post_dominators = _post_dominators(self.blocks)
        self.branches = {
            b: self._branch(b)
            for b in self.blocks
            if b.conditional and b not in self.latch_of and not self.is_loop_exit(b)
        }

    def innermost_loop(self, block: Block) -> Loop | None:
        containing = [loop for loop in self.loops if block in loop.blocks]
        return max(containing, key=lambda loop: loop.depth, default=None)

    def is_loop_exit(self, block: Block) -> bool:
        """A loop's exit test: a conditional BRA that stays in its innermost loop on one side and
        leaves it on the other; or a conditional EXIT/RET on the line of the loop's back edge (a
        loop with nothing after it ends the kernel from inside)."""
        loop = self.innermost_loop(block)
        if loop is None or not block.conditional or block in self.latch_of:
            return False
        if block.leaves:
            line = block.terminator.locations[:1]
            return bool(line) and any(latch.terminator.locations[:1] == line for latch in loop.latches)
        return block.jump is not None and (block.jump in loop.blocks) != (block.next in loop.blocks)

    def ends_iteration(self, block: Block) -> bool:
        """Whether a loop's exit test comes after the body: from its staying side to the back edge
        runs only code on the back-edge branch's line (a while loop's test comes before the body)."""
        loop = self.innermost_loop(block)
        control_lines = {latch.terminator.locations[:1] for latch in loop.latches}
        stay = block.next if block.leaves or block.jump not in loop.blocks else block.jump
        seen, stack = set(), [stay]
        while stack:
            b = stack.pop()
            if b in seen or b is loop.header:
                continue
            seen.add(b)
            if any(i.locations[:1] not in control_lines for i in b.instructions):
                return False
            stack.extend(s for s in b.successors if s in loop.blocks)
        return True

    def _branch(self, block: Block) -> Branch:
        join = _immediate(self.post_dominators, block)
        taken = None if block.leaves else block.jump
        return Branch(block, taken, block.next, join, self._region(taken, join), self._region(block.next, join))

    def _region(self, start: Block | None, join: Block | None) -> frozenset[Block]:
        """Blocks reachable from ``start`` before ``join``, not going around a loop's back edge."""
        seen: set[Block] = set()
        stack = [start] if start is not None and start is not join else []
        while stack:
            block = stack.pop()
            if block in seen:
                continue
            seen.add(block)
            stack.extend(
                s for s in block.successors if s is not join and s not in seen and (block, s) not in self._back_edges
            )
        return frozenset(seen)


def _split_blocks(function: Function) -> list[Block]:
    instructions = function.instructions
    if not instructions:
        raise ValueError(f"{function.name} has no instructions")
    index_at = {ins.address: i for i, ins in enumerate(instructions)}
    leaders = {0}
    for i, ins in enumerate(instructions):
        if ins.base in _INDIRECT:
            raise NotImplementedError(f"indirect branch at {ins.address:#06x} in {function.name}: {ins}")
        if _ends_block(ins):
            leaders.add(i + 1)
        if _is_branch(ins):
            leaders.add(index_at[_label_address(function, ins)])
    starts = sorted(i for i in leaders if i < len(instructions))
    blocks = [Block(function.name, tuple(instructions[a:b])) for a, b in pairwise([*starts, len(instructions)])]
    block_at = {b.start: b for b in blocks}
    for block, following in zip(blocks, [*blocks[1:], None], strict=True):
        last = block.terminator
        block.conditional = _ends_block(last) and _is_conditional(last)
        block.leaves = last.base in {"EXIT", "RET"}
        if _is_branch(last):
            block.jump = block_at[_label_address(function, last)]
        if not _ends_block(last) or block.conditional:
            block.next = following
    return blocks


def _label_address(function: Function, instruction: Instruction) -> int:
    if instruction.target not in function.labels:
        raise ValueError(f"branch target {instruction.target!r} of {instruction} is no label of {function.name}")
    return function.labels[instruction.target]


def _reverse_postorder(entry: Block) -> list[Block]:
    order, seen = [], set()
    stack = [(entry, iter(entry.successors))]
    seen.add(entry)
    while stack:
        block, successors = stack[-1]
        for s in successors:
            if s not in seen:
                seen.add(s)
                stack.append((s, iter(s.successors)))
                break
        else:
            order.append(block)
            stack.pop()
    return order[::-1]


def _dominators(order: list[Block], predecessors: Mapping[Block, list[Block]]) -> dict[Block, set[Block]]:
    """Every reachable block (``order``: reverse postorder from the entry) -> the blocks that dominate it
    (itself included)."""
    entry = order[0]
    dom = {b: set(order) for b in order}
    dom[entry] = {entry}
    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            new = {b} | set.intersection(*(dom[p] for p in predecessors[b]))
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


_EXIT = Block("<exit>", ())  # the virtual node every EXIT and RET leads to


def _post_dominators(blocks: list[Block]) -> dict[Block, set[Block]]:
    """Every block -> the blocks on every path from it to the function's exit (``_EXIT`` included)."""

    def successors(b):
        return [*b.successors, _EXIT] if b.leaves else b.successors

    pdom = {b: {*blocks, _EXIT} for b in blocks}
    pdom[_EXIT] = {_EXIT}
    changed = True
    while changed:
        changed = False
        for b in reversed(blocks):
            new = {b} | set.intersection(*(pdom[s] for s in successors(b))) if successors(b) else {b}
            if new != pdom[b]:
                pdom[b], changed = new, True
    return pdom


def _immediate(pdom: dict[Block, set[Block]], block: Block) -> Block | None:
    """The closest strict post-dominator: its own set is one smaller (the sets nest)."""
    strict = pdom[block] - {block}
    closest = next((d for d in strict if len(pdom[d]) == len(strict)), _EXIT)
    return None if closest is _EXIT else closest


def _natural_loops(
    blocks: list[Block], dom: dict[Block, set[Block]], order: list[Block], predecessors: Mapping[Block, list[Block]]
) -> list[Loop]:
    """One loop per header (its back edges merged), outermost first; irreducible flow is an error."""
    rank = {b: i for i, b in enumerate(order)}  # reverse postorder
    latches: dict[Block, list[Block]] = {}
    for b in blocks:
        for s in b.successors:
            if s in dom[b]:
                latches.setdefault(s, []).append(b)
            elif rank[s] <= rank[b]:
                raise NotImplementedError(f"irreducible control flow: {b} -> {s}")
    loops = []
    for header, tails in latches.items():
        body, stack = {header}, list(tails)
        while stack:
            b = stack.pop()
            if b not in body:
                body.add(b)
                stack.extend(predecessors[b])
        exiting = [b for b in body if any(s not in body for s in b.successors)]
        control = tuple(sorted({b.terminator for b in [*tails, *exiting]}, key=lambda i: i.address))
        loops.append(Loop(header, frozenset(body), tuple(tails), control))
    loops.sort(key=lambda loop: -len(loop.blocks))
    for i, loop in enumerate(loops):
        loop.parent = next((outer for outer in reversed(loops[:i]) if loop.blocks < outer.blocks), None)
    return loops


# ----------------------------------------------------------------------------------------------
# The path walk


class Decision(enum.Enum):
    TAKEN = "taken"  # the branch jumps (EXIT: the warp exits, RET: returns)
    NOT_TAKEN = "not taken"
    BOTH = "both"  # divergent: the warp runs both sides, one after the other


LineKey = int | tuple[str, int]  # a line in any file, or (file or its trailing path components, line)
Decider = Callable[[Branch], "Decision | None"]  # None: not this decider's branch


class WalkError(Exception):
    pass


class UnknownLoop(WalkError):
    pass


class UndecidedBranch(WalkError):
    pass


def _same_file(path: str, key: str) -> bool:
    key = os.path.normpath(key)
    return path == key or path.endswith("/" + key.lstrip("/"))


def _matches(key: LineKey, location: Location) -> bool:
    if isinstance(key, int):
        return location.line == key
    file, line = key
    return location.line == line and _same_file(location.file, file)


def _lookup(mapping: Mapping[LineKey, object], chains: Iterable[tuple[Location, ...]]):
    """The first key matching a location of the chains, innermost level first: (key, location) or None."""
    chains = list(chains)
    for level in range(max((len(c) for c in chains), default=0)):
        for chain in chains:
            if level < len(chain):
                for key in mapping:
                    if _matches(key, chain[level]):
                        return key, chain[level]
    return None


def _region_has(branch: Branch, taken: bool, line: LineKey) -> bool:
    return any(_matches(line, loc) for loc in branch.region_locations(taken))


def runs(line: LineKey) -> Decider:
    """Decide for the side whose code comes from ``line`` (at any inlining level): it runs."""

    def decide(branch: Branch) -> Decision | None:
        in_taken, in_not_taken = _region_has(branch, True, line), _region_has(branch, False, line)
        if in_taken and in_not_taken:
            raise WalkError(f"runs({line!r}): both sides hold that line: {branch.describe()}")
        if in_taken:
            return Decision.TAKEN
        return Decision.NOT_TAKEN if in_not_taken else None

    decide.__qualname__ = f"runs({line!r})"
    return decide


def other_side(decider: Decider) -> Decider:
    """Decide for the side ``decider`` does not pick (no decision where it makes none)."""

    def decide(branch: Branch) -> Decision | None:
        return {Decision.TAKEN: Decision.NOT_TAKEN, Decision.NOT_TAKEN: Decision.TAKEN}.get(decider(branch))

    decide.__qualname__ = f"other_side({getattr(decider, '__qualname__', repr(decider))})"
    return decide


def skips(line: LineKey) -> Decider:
    """Decide for the side without ``line``: the side whose code comes from ``line`` does not run."""
    decide = other_side(runs(line))
    decide.__qualname__ = f"skips({line!r})"
    return decide


def side_with(accepts: Callable[[Instruction], bool], name: str) -> Decider:
    """Decide for the side holding an instruction ``accepts`` takes, when exactly one side holds one."""

    def decide(branch: Branch) -> Decision | None:
        taken, not_taken = (
            any(accepts(i) for b in branch.region(side) for i in b.instructions) for side in (True, False)
        )
        if taken == not_taken:
            return None
        return Decision.TAKEN if taken else Decision.NOT_TAKEN

    decide.__qualname__ = f"side_with({name})"
    return decide


def both_sides(branch: Branch) -> Decision:
    """Every branch divergent: the warp runs both sides (an upper bound for lane-dependent branches)."""
    return Decision.BOTH


# The side that does not call a runtime subroutine (``$__internal_...``: the slow path of a 64-bit
# division, of an IEEE fp64 division) runs, when exactly one side calls one.
skip_slow_paths = other_side(
    side_with(lambda i: i.base == "CALL" and (i.target or "").startswith("$__internal_"), "a runtime call")
)
skip_slow_paths.__qualname__ = "skip_slow_paths"


def convergent(branch: Branch) -> Decision | None:
    """``BRA.DIV`` (taken only when the warp is diverged) is not taken."""
    return Decision.NOT_TAKEN if branch.instruction.opcode.startswith("BRA.DIV") else None


class _End(enum.Enum):
    JOINED = "joined"
    RETURNED = "returned"
    EXITED = "exited"


def _ending(block: Block) -> _End:
    return _End.EXITED if block.terminator.base == "EXIT" else _End.RETURNED


@dataclass
class Walk:
    """The path of one warp: how often each instruction ran, and what was decided on the way."""

    kernel: str
    executions: Counter  # Instruction -> times executed
    trips: dict[Loop, int]
    decisions: dict[Instruction, tuple[Decision, str]]  # branch instruction -> (decision, who decided)

    @property
    def warp_instructions(self) -> int:
        return sum(self.executions.values())

    def thread_instructions(self, num_warps: int) -> int:
        """Per program: every warp instruction issues for 32 threads, predicated-off lanes included."""
        return self.warp_instructions * 32 * num_warps

    def by_class(self, philox: Sequence[SourceRange] | None = None) -> dict[str, int]:
        """Warp instructions per class of ``CLASSES`` (every class present, zeros included)."""
        counts = dict.fromkeys(CLASSES, 0)
        for instruction, n in self.executions.items():
            counts[classify(instruction, philox)] += n
        return counts

    def decision_at(self, address: int, function: str | None = None) -> Decision:
        for instruction, (decision, _) in self.decisions.items():
            if instruction.address == address and function in (None, instruction.function):
                return decision
        raise KeyError(f"no branch decided at {address:#06x}")


def walk(
    functions: Mapping[str, Function], kernel: str | None = None, *,
    trips: Mapping[LineKey, int | Callable[[Loop], int]] | None = None,
    branches: Mapping[LineKey, Decision | Decider] | None = None, default: Decider | Sequence[Decider] = (),
) -> Walk:  # fmt: skip
    """Count the instructions one warp executes in ``kernel`` (the only kernel if None).

    ``trips``: source line -> trip count of the loops it identifies (an int, or a function of the
    ``Loop``). ``branches``: source line of a branch instruction -> ``Decision`` or decider.
    ``default``: deciders tried in order for branches no key matches. A branch is decided by the
    first of: its loop's trip count (the guard of a loop, on the loop's line), ``branches`` (the
    key of its innermost matching inlining level), ``default``. Raises ``UnknownLoop`` or
    ``UndecidedBranch`` for what is left undecided.
    """
    if kernel is None:
        kernels = [name for name, f in functions.items() if f.entry]
        if len(kernels) != 1:
            raise ValueError(f"name the kernel: the cubin has {kernels}")
        kernel = kernels[0]
    defaults = [default] if callable(default) else list(default)
    walker = _Walker(functions, trips or {}, branches or {}, defaults)
    walker.call(kernel, depth=0)
    return Walk(kernel, walker.executions, walker.trips, walker.decisions)


class _Walker:
    MAX_BLOCKS = 10_000_000  # block visits: a loop that never ends is an error, not a hang
    MAX_CALL_DEPTH = 32

    def __init__(self, functions, trips, branches, defaults):
        self.functions = functions
        self.trip_keys = trips
        self.branch_keys = branches
        self.defaults = defaults
        self.cfgs: dict[str, ControlFlowGraph] = {}
        self.executions: Counter = Counter()
        self.trips: dict[Loop, int] = {}
        self.loop_keys: dict[Loop, Location] = {}
        self.iterations: dict[Loop, int] = {}  # latch executions (completed iterations) since the loop was entered
        self.decisions: dict[Instruction, tuple[Decision, str]] = {}
        self.visits = 0

    def cfg(self, name: str) -> ControlFlowGraph:
        if name not in self.cfgs:
            if name not in self.functions:
                raise WalkError(f"call to {name}, which is not in the cubin")
            self.cfgs[name] = ControlFlowGraph(self.functions[name])
        return self.cfgs[name]

    def call(self, name: str, depth: int) -> _End:
        if depth > self.MAX_CALL_DEPTH:
            raise WalkError(f"calls nested deeper than {self.MAX_CALL_DEPTH} at {name}: recursion?")
        cfg = self.cfg(name)
        return self.run(cfg, cfg.entry, None, frozenset(), None, depth)

    def run(self, cfg, block, stop, fence, previous, depth) -> _End:
        """Execute from ``block`` until ``stop`` (a join; None: the function's end)."""
        while block is not stop:
            self.arrive(cfg, previous, block, fence)
            for instruction in block.instructions:
                self.executions[instruction] += 1
                if instruction.base == "CALL":
                    if instruction.predicated:
                        raise WalkError(f"predicated call not supported: {instruction}")
                    if self.call(instruction.target, depth + 1) is _End.EXITED:
                        return _End.EXITED
            step = self.leave(cfg, block, fence, depth)
            if isinstance(step, _End):
                return step
            previous, block = block, step
        return _End.JOINED

    def arrive(self, cfg, previous, block, fence) -> None:
        """Track loop entries (a new entry restarts the count) and keep divergent sides inside."""
        self.visits += 1
        if self.visits > self.MAX_BLOCKS:
            raise WalkError(f"more than {self.MAX_BLOCKS} blocks executed: a loop that never ends?")
        for loop in fence:
            if previous in loop.blocks and (block is loop.header or block not in loop.blocks):
                raise WalkError(f"a divergent branch's side leaves or repeats its {loop.describe()}: unsupported")
        for loop in cfg.loops_at.get(block, ()):
            if previous is None or previous not in loop.blocks:
                self.trip_count(loop)  # an unknown loop is an error when entered
                self.iterations[loop] = 0

    def leave(self, cfg, block, fence, depth):
        """The next block, or how the function ended."""
        if block.leaves and not block.conditional:
            return _ending(block)
        latch_of = cfg.latch_of.get(block)
        if latch_of is not None:
            self.iterations[latch_of] += 1
        if not block.conditional:
            target = block.jump or block.next
            if target is None:
                raise WalkError(f"{block} falls off the end of {block.function}")
            return target
        if latch_of is not None:  # a do-while's test: this iteration is done
            back, other = (block.jump, block.next) if block.jump is latch_of.header else (block.next, block.jump)
            if other in latch_of.blocks:
                raise WalkError(f"{latch_of.describe()}: a latch that may stay in the loop is not supported")
            return back if self.iterations[latch_of] < self.trip_count(latch_of) else other
        if block not in cfg.branches:
            return self.loop_exit(cfg, block)
        branch = cfg.branches[block]
        decision = self.decide(cfg, branch)
        if decision is Decision.TAKEN:
            return _ending(block) if branch.taken is None else branch.taken
        if decision is Decision.NOT_TAKEN or branch.taken is None:  # some lanes exit, the warp goes on
            return branch.not_taken
        inner = fence | {loop for loop in cfg.loops if block in loop.blocks}
        ends = [self.run(cfg, side, branch.join, inner, block, depth) for side in (branch.taken, branch.not_taken)]
        if branch.join is None:
            return _End.RETURNED if _End.RETURNED in ends else _End.EXITED
        return branch.join

    def loop_exit(self, cfg, block):
        """Leave once the body has run trips times: counting this pass if the test comes after the body."""
        loop = cfg.innermost_loop(block)
        if block.leaves:
            stay, leave = block.next, _ending(block)
        else:
            stay, leave = (block.jump, block.next) if block.jump in loop.blocks else (block.next, block.jump)
        done = self.iterations[loop] + cfg.ends_iteration(block) >= self.trip_count(loop)
        return leave if done else stay

    def trip_count(self, loop: Loop) -> int:
        if loop not in self.trips:
            found = _lookup(self.trip_keys, (i.locations for i in loop.control))
            if found is None:
                raise UnknownLoop(f"no trip count for the {loop.describe()}: key one of its lines in `trips`")
            key, location = found
            value = self.trip_keys[key]
            trips = value(loop) if callable(value) else value
            if not isinstance(trips, int) or trips < 0:
                raise WalkError(f"trip count {trips!r} (key {key!r}) of the {loop.describe()}")
            self.trips[loop], self.loop_keys[loop] = trips, location
        return self.trips[loop]

    def decide(self, cfg, branch: Branch) -> Decision:
        """Decisions are static: a branch is decided once, whatever the iteration or call site."""
        if branch.instruction not in self.decisions:
            self.decisions[branch.instruction] = self._decision(cfg, branch)
        return self.decisions[branch.instruction][0]

    def _decision(self, cfg, branch: Branch) -> tuple[Decision, str]:
        if branch.taken is branch.not_taken:
            return Decision.NOT_TAKEN, "both sides the same"
        guarded = self._guarded_loop(cfg, branch)
        if guarded is not None:
            loop, in_taken = guarded
            enters = self.trips[loop] > 0
            return (Decision.TAKEN if in_taken == enters else Decision.NOT_TAKEN), f"guard of the {loop.describe()}"
        found = _lookup(self.branch_keys, [branch.instruction.locations])
        if found is not None:
            key = found[0]
            value = self.branch_keys[key]
            decision = value(branch) if callable(value) else value
            if not isinstance(decision, Decision):
                raise UndecidedBranch(f"{value} (key {key!r}) gave {decision!r} for the {branch.describe()}")
            return decision, f"key {key!r}"
        for decider in self.defaults:
            decision = decider(branch)
            if decision is not None:
                return decision, getattr(decider, "__qualname__", repr(decider))
        hint = ""
        if any(loc in branch.instruction.locations for loc in self.loop_keys.values()):
            hint = (
                "; it is on a loop's line: ptxas may have unrolled or versioned that loop (remainder iterations), "
                "so decide it by address and count the main loop's trips accordingly"
            )
        raise UndecidedBranch(
            f"undecided {branch.describe()}: decide it in `branches` (keyed by one of its lines) or `default`{hint}"
        )

    def _guarded_loop(self, cfg, branch: Branch) -> tuple[Loop, bool] | None:
        """(loop, is it on the taken side) if the branch skips a loop and is attributed to the loop's line."""
        for loop in cfg.loops:
            in_taken, in_not_taken = loop.header in branch.taken_region, loop.header in branch.not_taken_region
            if branch.block in loop.blocks or in_taken == in_not_taken:
                continue
            if _lookup(self.trip_keys, (i.locations for i in loop.control)) is None:
                line = branch.instruction.locations[:1]
                if line and any(i.locations[:1] == line for i in loop.control):
                    self.trip_count(loop)  # on the loop's own line: only its trip count decides it (raises)
                continue  # a loop on other lines: the branch is the caller's to decide
            self.trip_count(loop)
            if self.loop_keys[loop] in branch.instruction.locations:
                return loop, in_taken
        return None


# ----------------------------------------------------------------------------------------------
# Classification

CLASSES = ("philox", "fp32", "fp64", "mufu", "int", "convert", "memory", "sync", "uniform", "other")

_OPCODE_CLASSES = {
    "fp32": "FADD FADD32I FMUL FMUL32I FFMA FFMA32I FMNMX FSEL FSET FSETP FCHK FSWZADD "
    "HADD2 HADD2_32I HMUL2 HMUL2_32I HFMA2 HFMA2_32I HMNMX2 HSET2 HSETP2",
    "fp64": "DADD DMUL DFMA DMNMX DSET DSETP",
    "mufu": "MUFU",
    "int": "IADD IADD3 IADD32I IMAD IMUL IMNMX VIMNMX VIMNMX3 VIADD VIADDMNMX IABS IDP ISCADD ISETP ISET LEA LOP "
    "LOP3 LOP32I SHF SHL SHR SEL PRMT POPC FLO BREV BMSK SGXT PLOP3 P2R R2P BFE BFI",
    "convert": "F2F F2I I2F F2FP I2FP F2IP I2IP I2I FRND",
    "memory": "LDG STG LDS STS LDC LD ST LDL STL ATOM ATOMG ATOMS RED LDSM STSM LDGSTS LDGDEPBAR CCTL CCTLL "
    "TEX TLD TLD4 TXQ SULD SUST SUATOM SURED UTMALDG UTMASTG UTMAPF UTMAREDG UTMACCTL UTMACMDFLUSH UBLKCP UBLKRED "
    "UBLKPF",
    "sync": "SHFL BAR WARPSYNC VOTE VOTEU MEMBAR BSSY BSYNC DEPBAR ERRBAR MATCH REDUX SYNCS NANOSLEEP CGAERRBAR "
    "FENCE ELECT ARRIVES WARPGROUP",
    "other": "MOV MOV32I MOVM BRA EXIT RET CALL S2R CS2R S2UR R2UR NOP BMOV YIELD BPT KILL PMTRIG",
}
OPCODE_CLASSES = {op: cls for cls, ops in _OPCODE_CLASSES.items() for op in ops.split()}


@dataclass(frozen=True)
class SourceRange:
    """Lines ``first``..``last`` of a file, given as its path or its trailing path components."""

    file: str
    first: int
    last: int

    def __contains__(self, location: Location) -> bool:
        return self.first <= location.line <= self.last and _same_file(location.file, self.file)


def python_function_lines(path: Path | str, name: str) -> SourceRange:
    """The lines of the top-level Python function ``name`` in a file (decorators excluded)."""
    tree = ast.parse(Path(path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return SourceRange(str(path), node.lineno, node.end_lineno)
    raise ValueError(f"no function {name} in {path}")


def cpp_function_lines(path: Path | str, name: str) -> SourceRange:
    """The lines of the C/C++ function ``name`` defined in a file: from the line naming it to its
    closing brace (braces counted, comments and strings ignored: enough for plain device code)."""
    text = Path(path).read_text()
    code = re.sub(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\])*\"", lambda m: re.sub(r"[^\n]", " ", m[0]), text, flags=re.S)
    for m in re.finditer(rf"\b{re.escape(name)}\s*\([^;{{]*\)\s*[^;{{]*\{{", code):
        depth = 0
        for i in range(m.end() - 1, len(code)):
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            if depth == 0:
                return SourceRange(str(path), code.count("\n", 0, m.start()) + 1, code.count("\n", 0, i) + 1)
    raise ValueError(f"no definition of {name} in {path}")


@functools.cache
def triton_philox() -> tuple[SourceRange, ...]:
    """Triton's Philox: ``philox`` and ``philox_impl`` of the installed ``triton/language/random.py``."""
    from triton.language import random

    return tuple(python_function_lines(random.__file__, name) for name in ("philox", "philox_impl"))


def classify(instruction: Instruction, philox: Sequence[SourceRange] | None = None) -> str:
    """The class in ``CLASSES`` of one instruction. "philox": an "int" instruction with a source
    location, at any inlining level, in ``philox`` (default: Triton's Philox); any level, because
    helpers like ``umulhi`` or a C++ ``mulhi32`` are the innermost location of the multiplies."""
    base = instruction.base
    if base in OPCODE_CLASSES:
        cls = OPCODE_CLASSES[base]
    elif base.startswith("U"):
        cls = "uniform"
    else:
        raise ValueError(f"unclassified opcode {instruction.opcode} ({instruction}): add it to OPCODE_CLASSES")
    if cls == "int":
        ranges = triton_philox() if philox is None else philox
        if any(loc in r for loc in instruction.locations for r in ranges):
            return "philox"
    return cls


# ----------------------------------------------------------------------------------------------
# Registers, spills, occupancy


@dataclass(frozen=True)
class Resources:
    """``cuobjdump --dump-resource-usage`` for one function."""

    registers: int
    stack: int
    local: int
    shared: int  # static shared memory; on sm_90 it includes the 1 KB reserve once the kernel uses any

    @property
    def spill_bytes(self) -> int:
        """Local memory per thread: spilled registers (and call frames, which our kernels have none of)."""
        return self.stack + self.local

    @property
    def own_shared(self) -> int:
        """The static shared memory the kernel declares, without sm_90's 1 KB system reserve."""
        return max(self.shared - SM90.reserved_shared_per_block, 0)


def resource_usage(cubin: bytes) -> dict[str, Resources]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        text = subprocess.run(
            [_require_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(.*)", text):
        values = dict(re.findall(r"(\w+):(\d+)", fields))
        usage[name] = Resources(int(values["REG"]), int(values["STACK"]), int(values["LOCAL"]), int(values["SHARED"]))
    return usage


@dataclass(frozen=True)
class SMLimits:
    registers: int = 65536  # per SM, and at most this many per block
    register_unit: int = 256  # registers are allocated per warp, in units of 256
    subpartitions: int = 4  # each of the 4 SMSPs holds a quarter of the register file; a warp lives in one
    max_warps: int = 64  # 2048 threads
    max_blocks: int = 32
    shared: int = 228 * 1024  # the largest L1/shared carveout
    reserved_shared_per_block: int = 1024  # the driver's reserve, per block
    shared_unit: int = 128  # shared memory allocation granularity


SM90 = SMLimits()


@dataclass(frozen=True)
class Occupancy:
    by_registers: int
    by_warps: int
    by_blocks: int
    by_shared: int

    @property
    def blocks(self) -> int:
        return min(self.by_registers, self.by_warps, self.by_blocks, self.by_shared)

    @property
    def limiter(self) -> str:
        limits = {
            "registers": self.by_registers,
            "warps": self.by_warps,
            "blocks": self.by_blocks,
            "shared": self.by_shared,
        }
        return min(limits, key=limits.get)


def blocks_per_sm(registers: int, threads: int, shared_bytes: int = 0, limits: SMLimits = SM90) -> Occupancy:
    """Resident blocks per SM, as the CUDA occupancy calculator computes them.

    warps = ceil(threads / 32); registers per warp = ceil(registers x 32 / 256) x 256;
    by registers: (65536 / 4 // per-warp registers) warps per SMSP x 4 SMSPs // warps, and 0 when
    a block needs more than 65536; by warps: 64 // warps; by blocks: 32; by shared memory:
    228 KB // roundup(shared_bytes + 1 KB, 128). ``shared_bytes`` is the block's own shared
    memory, static plus dynamic, without the 1 KB reserve (``Resources.own_shared`` + Triton's
    ``CompiledKernel.shared``).
    """
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(registers * 32 / limits.register_unit) * limits.register_unit
    if per_warp * warps > limits.registers:
        by_registers = 0
    else:
        per_subpartition = limits.registers // limits.subpartitions // per_warp
        by_registers = per_subpartition * limits.subpartitions // warps
    per_block = math.ceil((shared_bytes + limits.reserved_shared_per_block) / limits.shared_unit) * limits.shared_unit
    return Occupancy(by_registers, limits.max_warps // warps, limits.max_blocks, limits.shared // per_block)


# ----------------------------------------------------------------------------------------------
# Throughput model

H100_SMS = 132
LANES_PER_SM = 128  # 4 SMSPs, each issuing one warp instruction (32 threads) per clock
H100_CLOCK_HZ = 1.755e9  # the SM clock the model (and its calibration) assumes under load
H100_ISSUE_RATE = H100_SMS * LANES_PER_SM * H100_CLOCK_HZ  # 29.65e12 thread-instructions/s
H100_COPY_BANDWIDTH = 3.0e12  # bytes/s of a streaming copy, the memory floor (HBM3 peaks at 3.35e12)
# Issue efficiency (measured rate / issue rate) of our Triton step (label pass, loss pass with
# the gradient, the backward's scaling), measured on an H100 80GB HBM3 (2026-11-27, Triton 3.6,
# kernels replayed in a CUDA graph; benchmarks/RESULTS.md), fp32 / bf16 NCHW: 8x19x512x1024
# 0.51 / 0.62, 16x150x512x512 0.46 / 0.55, 8x171x512x512 0.51 / 0.58. The values are the middle
# of each range (C = 171 takes C = 150's): the NCHW times are 0.89-1.13x the predictions, fp32
# slower than predicted and bf16 faster (fp32's twice the bytes compete with the issue). The
# issue time alone missed 65536x1000 rows (two sweeps, a thread walking its row 8 classes at a
# time) by 3.3-3.6x (0.15 efficiency): its warp accesses, 32 rows apiece, bound it (below).
EFFICIENCY_CALIBRATION = {19: 0.56, 150: 0.52}
# The L1's throughput for warp accesses: a load or store of a warp costs one wavefront per 128-byte
# line it touches (``static_report.line_accesses``). Fitted to the one measurement where it binds:
# the 65536x1000 rows of the two-sweep kernel then (3.0 lines per element, 32 rows a warp access)
# took 1.400 ms in fp32 on the H100 above, 0.606 lines per SM and clock; bf16 (3.0 lines, 1.342
# ms measured) is then predicted at 1.400. NCHW touches 0.06-0.1 lines per element: never the bound.
H100_LINES_PER_CLOCK = 0.606
H100_LINE_RATE = H100_SMS * H100_CLOCK_HZ * H100_LINES_PER_CLOCK  # 1.40e11 lines/s


def calibrated_efficiency(num_classes: int) -> float:
    """The calibration, interpolated linearly in the class count and held flat outside [19, 150]:
    a guide for kernels like the calibrated one, not a law."""
    (c0, e0), (c1, e1) = sorted(EFFICIENCY_CALIBRATION.items())
    t = min(max((num_classes - c0) / (c1 - c0), 0.0), 1.0)
    return e0 + t * (e1 - e0)


@dataclass(frozen=True)
class Prediction:
    issue_ms: float
    memory_ms: float
    access_ms: float = 0.0  # the L1's wavefronts

    @property
    def ms(self) -> float:
        return max(self.issue_ms, self.memory_ms, self.access_ms)

    @property
    def bound(self) -> str:
        return max(("issue", self.issue_ms), ("memory", self.memory_ms), ("access", self.access_ms),
                   key=lambda named: named[1])[0]  # fmt: skip


def predict(
    thread_instructions: float, bytes_moved: float, efficiency: float, *, lines: float = 0.0,
    issue_rate: float = H100_ISSUE_RATE, bandwidth: float = H100_COPY_BANDWIDTH, line_rate: float = H100_LINE_RATE,
) -> Prediction:  # fmt: skip
    """Time of a launch executing ``thread_instructions`` in all (per element x elements), moving
    ``bytes_moved`` to or from DRAM and touching ``lines`` 128-byte lines in its warps' accesses:
    the largest of the issue time at ``efficiency`` x the issue rate, the copy-bandwidth floor and
    the L1's time for the lines."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency {efficiency} outside (0, 1]")
    return Prediction(1e3 * thread_instructions / (issue_rate * efficiency), 1e3 * bytes_moved / bandwidth,
                      1e3 * lines / line_rate)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Per-kernel report


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    num_warps: int
    elements: float  # logical elements one program covers (positions x real classes; a grid's mean)
    per_element: dict[str, float]  # thread instructions per element, by class
    registers: int | None = None
    spill_bytes: int | None = None
    occupancy: Occupancy | None = None

    @property
    def total(self) -> float:
        return sum(self.per_element.values())


def report(
    result: Walk, *, num_warps: int, elements: float, resources: Resources | None = None, dynamic_shared: int = 0,
    philox: Sequence[SourceRange] | None = None,
) -> KernelReport:  # fmt: skip
    """Thread instructions per logical element by class, with registers, spills and occupancy."""
    scale = 32 * num_warps / elements
    per_element = {cls: n * scale for cls, n in result.by_class(philox).items()}
    if resources is None:
        return KernelReport(result.kernel, num_warps, elements, per_element)
    occupancy = blocks_per_sm(resources.registers, 32 * num_warps, resources.own_shared + dynamic_shared)
    return KernelReport(
        result.kernel, num_warps, elements, per_element, resources.registers, resources.spill_bytes, occupancy
    )


# ----------------------------------------------------------------------------------------------
# Text helpers


def _chain_text(chain: Sequence[Location]) -> str:
    if not chain:
        return "no line info"
    outer = [str(o.line) if o.file == i.file else str(o) for i, o in pairwise(chain)]
    return str(chain[0]) + (f" inlined at {', '.join(outer)}" if outer else "")


def _lines_text(locations: Iterable[Location]) -> str:
    """Line ranges per file: a.py:3-5,9; b.py:12."""
    by_file: dict[str, set[int]] = {}
    for loc in locations:
        by_file.setdefault(Path(loc.file).name, set()).add(loc.line)
    return "; ".join(f"{name}:{_ranges_text(sorted(lines))}" for name, lines in sorted(by_file.items()))


def _ranges_text(lines: list[int]) -> str:
    spans: list[list[int]] = []
    for line in lines:
        if spans and line == spans[-1][1] + 1:
            spans[-1][1] = line
        else:
            spans.append([line, line])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
