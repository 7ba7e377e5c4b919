"""Packaging: the sdist and the wheel hold what they must, and the installed wheel runs on its own.

Both are built the way a user or an index builds them (``python -m build``: the sdist, then the
wheel from the unpacked sdist, each in an isolated environment), from a copy of the working
tree as a clean clone has it. The wheel is then installed into a fresh virtual environment and
run from outside the checkout, so the installed package, not the checkout, computes the demo,
and the CPU kernel is compiled on first use from the C sources the wheel carries. torch and
numpy come from this interpreter's environment through a .pth file: nothing is downloaded.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy
import pytest
import torch

import blv_kernels

REPO_ROOT = Path(__file__).resolve().parents[1]
C_SOURCES = {
    "blv_kernels/csrc/blv_kernel.h",
    "blv_kernels/csrc/blv_math.h",
    "blv_kernels/csrc/cpu/blv_kernel.cpp",
    "blv_kernels/csrc/cuda/blv_kernel.cu",
}
# what a clean clone does not have: environments, build output, caches, compiled libraries
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", ".ci-venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
    ".benchmarks", "_lib", "results",
)  # fmt: skip
DIST_INFO = f"blv_kernels-{blv_kernels.__version__}.dist-info"


def _repo_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / folder).glob(pattern) if p.is_file()}


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(work dir, sdist, wheel) built from a copy of the working tree."""
    pytest.importorskip("build", reason="the build frontend is not installed (it is in the [test] extra)")
    work = tmp_path_factory.mktemp("packaging")
    shutil.copytree(REPO_ROOT, work / "src", ignore=NOT_IN_A_CLONE)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(work / "src")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = (work / "dist").glob("*.tar.gz")
    (wheel,) = (work / "dist").glob("*.whl")
    return work, sdist, wheel


def test_sdist_holds_sources_tests_benchmarks_and_license(dists):
    _, sdist, _ = dists
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = C_SOURCES | {
        "blv_kernels/py.typed",
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "pyproject.toml",
        "setup.py",
    }
    expected |= _repo_files("blv_kernels", "**/*.py") | _repo_files("benchmarks", "*") | _repo_files("tests", "*.py")
    expected -= {name for name in expected if "__pycache__" in name}
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.endswith((".so", ".pyc"))]  # nothing compiled or cached


def test_wheel_holds_the_package_its_c_sources_and_license(dists):
    _, _, wheel = dists
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"{DIST_INFO}/METADATA").decode()
        entry_points = archive.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert C_SOURCES | {"blv_kernels/py.typed", f"{DIST_INFO}/licenses/LICENSE"} <= names
    assert _repo_files("blv_kernels", "**/*.py") - {n for n in names if n.endswith(".py")} == set()
    assert not [n for n in names if n.split("/")[0] in ("tests", "benchmarks")]  # not installed as packages
    assert "License-Expression: MIT" in metadata.splitlines()
    assert "blv-kernels = blv_kernels.__main__:main" in entry_points


def test_installed_wheel_runs_the_demo_outside_the_checkout(dists):
    work, _, wheel = dists
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    # torch and numpy (with their own dependencies) from here, added after the install so that
    # pip saw an environment without any blv_kernels; the venv's own site-packages come first
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    outer = sorted({str(Path(module.__file__).resolve().parents[1]) for module in (torch, numpy)})
    Path(site_packages, "outer_environment.pth").write_text("\n".join(outer) + "\n")

    run_dir = work / "elsewhere"  # not the checkout: `python -m` would find the checkout's package there
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["BLV_KERNELS_CACHE"] = str(work / "kernel_cache")  # an empty cache: the CPU kernel is built now

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], capture_output=True, text=True, cwd=run_dir, env=env, timeout=300)

    where = run(str(python), "-c", "import blv_kernels; print(blv_kernels.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    demo = run(str(python), "-m", "blv_kernels", "--batch", "1", "--height", "8", "--width", "8", "--backend", "cpu")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "BLV loss (sigma=6.0, backend=cpu)" in demo.stdout and "gradient: shape (1, 19, 8, 8)" in demo.stdout
    # compiled from the installed package's csrc/, into the cache it was given
    assert "compiling the cpu kernels" in demo.stderr and f"{site_packages}/blv_kernels/csrc/" in demo.stderr
    assert list((work / "kernel_cache").rglob("*.so"))
    version = run(str(venv / "bin" / "blv-kernels"), "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"blv_kernels {blv_kernels.__version__}"
    # the README's usage example, as a user pastes it, runs against the installed package
    readme = (REPO_ROOT / "README.md").read_text()
    example = readme.split("## Use\n", 1)[1].split("```python\n", 1)[1].split("```\n", 1)[0]
    (run_dir / "use.py").write_text(example + "print(float(loss))\n")
    use = run(str(python), "use.py")
    assert use.returncode == 0 and float(use.stdout.split()[-1]) > 0, use.stdout + use.stderr
