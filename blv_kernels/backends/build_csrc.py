"""Compiling ``blv_kernels/csrc`` into shared libraries with the C interface of ``csrc/blv_kernel.h``.

Standard library only, so that ``setup.py`` can use it without torch. A library is built
once and kept: by ``setup.py`` into the package (``BLV_BUILD_CPU=1`` / ``BLV_BUILD_CUDA=1``),
else on first use into a cache directory (``$BLV_KERNELS_CACHE``, by default
``~/.cache/blv_kernels``), named by a hash of its sources, flags and compiler, so an edit or
another compiler builds anew and concurrent first uses do not collide. A library setup.py
built carries the hash of the sources it was built from (``libblv_<name>.so.sha256``) and
serves only while they are unchanged: an edit to an editable install's csrc/ is compiled, not
ignored.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
PREBUILT = Path(__file__).resolve().parent.parent / "_lib"  # where setup.py puts libraries it built
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100/H200; PTX of the last one lets newer GPUs compile at load time


@dataclass(frozen=True)
class Library:
    """One shared library: its sources (relative to csrc/) and the compiler that builds it."""

    name: str
    sources: tuple[str, ...]
    compiler: str  # "c++" or "nvcc"
    extra_flags: tuple[str, ...] = ()  # placed before the sources (e.g. "-x", "c++")
    extra_inputs: tuple[Path, ...] = ()  # files outside csrc/ the build reads (they enter the fingerprint)

    def inputs(self) -> list[Path]:
        return [*(CSRC / s for s in self.sources), *sorted(CSRC.glob("*.h")), *self.extra_inputs]


LIBRARIES = {
    "cpu": Library("cpu", ("cpu/blv_kernel.cpp",), "c++"),
    "cuda": Library("cuda", ("cuda/blv_kernel.cu",), "nvcc"),
}


def compiler_path(compiler: str) -> str | None:
    if compiler == "nvcc":
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        candidates = [Path(home, "bin", "nvcc")] if home else []
        found = shutil.which("nvcc")
        return next((str(p) for p in candidates if p.exists()), found)
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def cuda_archs() -> list[str]:
    """``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0+PTX"), else the default."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    return [a for a in archs.replace(" ", ";").split(";") if a]


def source_flags() -> list[str]:
    """What every compile of csrc/ gets, library or not: the language, the optimisation, the include path."""
    return ["-O3", "-std=c++17", f"-I{CSRC}"]


def flags(library: Library, *, portable: bool) -> list[str]:
    """Compiler flags; ``portable``: no ``-march=native`` (a library built for other machines)."""
    if library.compiler == "nvcc":
        numbers = [arch.removesuffix("+PTX").replace(".", "") for arch in cuda_archs()]
        gencode = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in numbers]
        gencode.append(f"-gencode=arch=compute_{numbers[-1]},code=compute_{numbers[-1]}")
        return [*source_flags(), "-shared", "-Xcompiler", "-fPIC", "-lineinfo", *gencode, *library.extra_flags]
    native = [] if portable else ["-march=native"]
    return [*source_flags(), "-shared", "-fPIC", "-pthread", *native, *library.extra_flags]


def sources_digest(library: Library) -> str:
    """The sha256 of the files a build of ``library`` reads."""
    digest = hashlib.sha256()
    for path in library.inputs():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fingerprint(library: Library, compiler: str, command_flags: list[str]) -> str:
    digest = hashlib.sha256(sources_digest(library).encode())
    digest.update(" ".join([compiler, *command_flags]).encode())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest.update(version.encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    if os.environ.get("BLV_KERNELS_CACHE"):
        return Path(os.environ["BLV_KERNELS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blv_kernels"


def build(library: Library, output: Path, *, portable: bool, quiet: bool = False) -> Path:
    """Compile ``library`` into ``output`` (written atomically). Raises RuntimeError with the compiler's errors."""
    compiler = compiler_path(library.compiler)
    if compiler is None:
        raise RuntimeError(f"no {library.compiler} compiler found")
    command_flags = flags(library, portable=portable)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        partial = Path(tmp, output.name)
        command = [compiler, *command_flags, *(str(CSRC / s) for s in library.sources), "-o", str(partial)]
        if not quiet:
            print(f"blv_kernels: compiling the {library.name} kernels (once): {' '.join(command)}", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {library.name} failed:\n{result.stderr[-4000:]}")
        partial.replace(output)
    return output


def prebuilt_path(library: Library, directory: Path) -> Path:
    return directory / f"libblv_{library.name}.so"


def build_prebuilt(library: Library, directory: Path) -> Path:
    """setup.py's build: portable flags, into ``directory`` with the hash of its sources beside it."""
    output = build(library, prebuilt_path(library, directory), portable=True)
    output.with_name(output.name + ".sha256").write_text(sources_digest(library) + "\n")
    return output


def _current_prebuilt(library: Library) -> Path | None:
    """The library setup.py built, if it was built from the sources there are now."""
    prebuilt = prebuilt_path(library, PREBUILT)
    digest = prebuilt.with_name(prebuilt.name + ".sha256")
    if LIBRARIES.get(library.name) != library or not prebuilt.exists() or not digest.exists():
        return None
    return prebuilt if digest.read_text().strip() == sources_digest(library) else None


def library_path(library: Library, *, quiet: bool = False) -> Path:
    """The shared library: the one setup.py put in the package (while its sources are unchanged),
    else the cached build (built now if missing)."""
    prebuilt = _current_prebuilt(library)
    if prebuilt is not None:
        return prebuilt
    compiler = compiler_path(library.compiler)
    if compiler is None:
        raise RuntimeError(f"the {library.name} kernels are not built and no {library.compiler} compiler was found")
    command_flags = flags(library, portable=False)
    output = cache_dir() / f"libblv_{library.name}-{_fingerprint(library, compiler, command_flags)}.so"
    if not output.exists():
        build(library, output, portable=False, quiet=quiet)
    return output
