"""The command line: the demo (the default command) and count-classes on real label files; every bad
input gets one line on stderr and a non-zero exit, never a traceback, and leaves nothing written."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import blv_kernels.__main__ as cli
from blv_kernels import BLVLoss
from blv_kernels.__main__ import build_parser, main


def pil_image():
    """PIL.Image, or a skip: only the label-file tests need Pillow."""
    return pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install 'blv_kernels[data]')")


def run(argv, capsys):
    """(exit status, stdout, stderr) of the command, argparse's exits included."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *phrases: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def test_demo_prints_loss_and_gradient(capsys):
    assert main(["--batch", "1", "--height", "8", "--width", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "BLV loss (sigma=6.0" in out and "gradient: shape (1, 19, 8, 16)" in out


def test_demo_is_the_default_command(capsys):
    assert main([]) == 0
    assert "gradient: shape (2, 19, 64, 128)" in capsys.readouterr().out
    assert main(["demo", "--batch", "1", "--height", "4", "--width", "4"]) == 0
    assert "gradient: shape (1, 19, 4, 4)" in capsys.readouterr().out


@pytest.fixture
def label_dir(tmp_path, rng):
    """Cityscapes-like label PNGs in nested folders, one with an out-of-range value, one unreadable."""
    Image = pil_image()
    counts = np.zeros(4, dtype=np.int64)
    for i in range(5):
        label = torch.randint(0, 4, (6, 10), generator=rng, dtype=torch.uint8).numpy()
        label[:2] = 255
        if i == 3:
            label[5, :4] = 9  # outside [0, 4): reported and left out
        counts += np.bincount(label[label < 4], minlength=4)
        folder = tmp_path / ("aachen" if i < 3 else "bochum")
        folder.mkdir(exist_ok=True)
        Image.fromarray(label).save(folder / f"img{i}_gtFine_labelTrainIds.png")
    (tmp_path / "bochum" / "img9_gtFine_labelTrainIds.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "bochum" / "img0_gtFine_color.png").write_bytes(b"not matched by the pattern")
    return tmp_path, counts.tolist()


def test_count_classes_writes_json_for_blv_loss(label_dir, tmp_path, capsys):
    root, expected = label_dir
    out = tmp_path / "counts.json"
    argv = ["count-classes", str(root), "--num-classes", "4", "--ignore-index", "255"]
    argv += ["--pattern", "*_labelTrainIds.png", "-o", str(out), "--workers", "2", "--quiet"]
    assert main(argv) == 0
    assert json.loads(out.read_text()) == expected
    BLVLoss(json.loads(out.read_text()))  # accepted as it is
    err = capsys.readouterr().err
    assert "img9_gtFine_labelTrainIds.png: unreadable, skipped" in err
    assert "img3_gtFine_labelTrainIds.png: labels outside [0, 4) and not 255, not counted: value 9: 4 px" in err
    assert "counted 5 of 6 files" in err


def test_count_classes_prints_to_stdout_and_warns_of_unseen_classes(label_dir, capsys):
    root, expected = label_dir
    assert main(["count-classes", str(root / "aachen"), "--num-classes", "6", "--quiet", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    counts = json.loads(captured.out)
    assert counts[4:] == [0, 0] and sum(counts) > 0
    assert "class(es) [4, 5] have no pixels" in captured.err


def test_count_classes_errors(tmp_path, capsys):
    assert main(["count-classes", str(tmp_path / "missing"), "--num-classes", "4"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["count-classes", str(tmp_path), "--num-classes", "4"]) == 2
    assert "no files matching '*.png'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["count-class", str(tmp_path)])  # a mistyped command is an argparse error, not the demo


def test_python_dash_m_runs_count_classes(label_dir, tmp_path):
    root, expected = label_dir
    out = tmp_path / "counts.json"
    cmd = [sys.executable, "-m", "blv_kernels", "count-classes", str(root), "--num-classes", "4", "-o", str(out)]
    proc = subprocess.run(cmd + ["--pattern", "*_labelTrainIds.png"], capture_output=True, text=True, check=True)
    assert json.loads(out.read_text()) == expected
    assert "counted 5 of 6 files" in proc.stderr


def _save_labels(folder, rng, n, num_classes, suffix="_gtFine_labelTrainIds.png"):
    """n random label PNGs in folder; returns them."""
    Image = pil_image()
    folder.mkdir(parents=True, exist_ok=True)
    labels = [torch.randint(0, num_classes, (5, 7), generator=rng, dtype=torch.uint8).numpy() for _ in range(n)]
    for i, label in enumerate(labels):
        Image.fromarray(label).save(folder / f"frame{i}{suffix}")
    return labels


@pytest.mark.parametrize("ignore_index", [0, 2])
def test_ignore_index_inside_the_classes_is_not_counted(tmp_path, rng, capsys, ignore_index):
    labels = _save_labels(tmp_path / "labels", rng, 3, 5)
    expected = np.bincount(np.concatenate([label.ravel() for label in labels]), minlength=5)
    expected[ignore_index] = 0
    argv = ["count-classes", str(tmp_path / "labels"), "--num-classes", "5", "--ignore-index", str(ignore_index)]
    code, out, err = run([*argv, "--quiet", "--workers", "1"], capsys)
    assert code == 0 and json.loads(out) == expected.tolist()
    assert f"class {ignore_index} is --ignore-index" in err


def test_default_pattern_refuses_mixed_cityscapes_kinds(tmp_path, rng, capsys):
    """Cityscapes' gtFine holds train ids beside label ids (values up to 33): '*.png' would add them up."""
    root = tmp_path / "gtFine" / "train"
    train_ids = _save_labels(root / "aachen", rng, 3, 19)
    _save_labels(root / "aachen", rng, 3, 34, suffix="_gtFine_labelIds.png")
    out_file = tmp_path / "counts.json"
    argv = ["count-classes", str(root), "--num-classes", "19", "-o", str(out_file), "--quiet"]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "" and not out_file.exists()
    assert_one_line_error(err, "2 kinds", "3 *_labelIds.png", "3 *_labelTrainIds.png", "'*_labelTrainIds.png'")
    code, out, err = run([*argv, "--pattern", "*_labelTrainIds.png"], capsys)
    assert code == 0
    expected = np.bincount(np.concatenate([label.ravel() for label in train_ids]), minlength=19)
    assert json.loads(out_file.read_text()) == expected.tolist()


@pytest.fixture
def small_label_dir(tmp_path, rng):
    _save_labels(tmp_path / "labels", rng, 2, 4)
    return tmp_path / "labels"


BAD_COUNT_OPTIONS = [
    (["--num-classes", "0"], "--num-classes: must be an integer >= 1"),
    (["--num-classes", "-3"], "--num-classes: must be an integer >= 1"),
    (["--num-classes", "1000000000"], "<= 1048576"),
    (["--num-classes", "four"], "--num-classes: expected an integer, got 'four'"),
    (["--num-classes", "4", "--workers", "0"], "--workers: must be an integer >= 1"),
    (["--num-classes", "4", "--workers", "-2"], "--workers: must be an integer >= 1"),
    (["--num-classes", "4", "--ignore-index", str(2**64)], "--ignore-index: must be an integer"),
    (["--num-classes", "4", "-o", "{tmp}/missing/counts.json"], "directory {tmp}/missing does not exist"),
    (["--num-classes", "4", "-o", "{tmp}"], "-o {tmp} is a directory"),
    (["--num-classes", "4", "-o", "{tmp}/nodir/"], "-o {tmp}/nodir/ names a directory, not a file"),  # not "nodir"
    (["--num-classes", "4", "-o", "{tmp}/nodir/."], "-o {tmp}/nodir/. names a directory, not a file"),
    (["--num-classes", "4", "-o", "{tmp}/pipe"], "-o {tmp}/pipe is not a regular file"),  # as /dev/null (replaced)
    (["--num-classes", "4", "--pattern", "/abs/*.png"], "invalid pattern '/abs/*.png'"),
    (["--num-classes", "4", "--pattern", "*.npy"], "no files matching '*.npy'"),
]


@pytest.mark.parametrize("options, message", BAD_COUNT_OPTIONS, ids=[" ".join(o) for o, _ in BAD_COUNT_OPTIONS])
def test_count_classes_bad_options_fail_before_counting(small_label_dir, tmp_path, capsys, monkeypatch, options,
                                                        message):  # fmt: skip
    def must_not_count(*args, **kwargs):
        raise AssertionError("counted although the command could not succeed")

    monkeypatch.setattr(cli, "count_label_files", must_not_count)
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    os.mkfifo(tmp_path / "pipe")
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run(["count-classes", str(small_label_dir), *options], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, message.replace("{tmp}", str(tmp_path)))
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="no /sys here")
def test_unwritable_output_directory_fails_before_counting(small_label_dir, capsys, monkeypatch):
    """/sys takes no new files, not even root's, for whom os.access says every directory is writable."""

    def must_not_count(*args, **kwargs):
        raise AssertionError("counted although the command could not succeed")

    monkeypatch.setattr(cli, "count_label_files", must_not_count)
    code, out, err = run(
        ["count-classes", str(small_label_dir), "--num-classes", "4", "-o", "/sys/counts.json"], capsys
    )
    assert code == 2 and out == ""
    assert_one_line_error(err, "-o /sys/counts.json: cannot create a file in directory /sys: ")


def test_empty_label_dir_is_refused(small_label_dir, capsys, monkeypatch):
    monkeypatch.chdir(small_label_dir)  # pathlib would take "" for it
    code, out, err = run(["count-classes", "", "--num-classes", "4", "--quiet"], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, "argument LABEL_DIR: the directory to search is an empty path")


def test_a_label_file_found_twice_through_a_link_is_one_line(small_label_dir, tmp_path, capsys):
    (tmp_path / "train").mkdir()
    first = sorted(small_label_dir.iterdir())[0]
    (tmp_path / "train" / first.name).symlink_to(first)
    code, out, err = run(["count-classes", str(tmp_path), "--num-classes", "4", "--quiet", "--workers", "1"], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, "1 file(s) under", "more than one path (a symbolic link)", str(first))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_counts_that_cannot_reach_stdout_are_an_error(small_label_dir):
    """A full disk, or stdout closed (where print writes nowhere): one line and exit 1, not a traceback or 0."""
    cmd = [sys.executable, "-m", "blv_kernels", "count-classes", str(small_label_dir), "--num-classes", "4", "--quiet"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr.splitlines()[-1], "cannot write the counts to stdout: No space left on device")
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr.splitlines()[-1], "stdout is closed", "-o FILE")
    assert "Traceback" not in proc.stderr


def test_all_files_unreadable_writes_nothing(tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    for i in range(3):
        (tmp_path / "labels" / f"{i}.png").write_bytes(b"\x89PNG truncated")
    out_file = tmp_path / "counts.json"
    argv = ["count-classes", str(tmp_path / "labels"), "--num-classes", "4", "--quiet", "--workers", "1"]
    code, out, err = run([*argv, "-o", str(out_file)], capsys)
    assert code == 1 and not out_file.exists() and out == ""
    assert err.count("unreadable, skipped") == 3
    assert (
        err.strip().splitlines()[-1]
        == "blv-kernels count-classes: error: none of the 3 files could be read: nothing written"
    )
    code, out, err = run(argv, capsys)
    assert code == 1 and out == ""  # no all-zero counts on stdout either


def test_missing_tqdm_is_needed_only_for_the_progress_bar(small_label_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    argv = ["count-classes", str(small_label_dir), "--num-classes", "4", "--workers", "1"]
    code, out, err = run([*argv, "--quiet"], capsys)
    assert code == 0 and len(json.loads(out)) == 4
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, "needs tqdm", "--quiet")


def test_missing_pillow_is_one_error_up_front(small_label_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    out_file = tmp_path / "counts.json"
    argv = ["count-classes", str(small_label_dir), "--num-classes", "4", "--quiet", "--workers", "1"]
    code, out, err = run([*argv, "-o", str(out_file)], capsys)
    assert code == 2 and out == "" and not out_file.exists()
    assert_one_line_error(err, "needs Pillow")


BAD_DEMO_OPTIONS = [
    (["--sigma", "-1"], "--sigma: must be a number in [0, 1e+37], got -1"),
    (["--sigma", "nan"], "--sigma: must be a number in [0, 1e+37]"),
    (["--sigma", "six"], "--sigma: expected a number"),
    (["--batch", "0"], "--batch: must be an integer >= 1, got 0"),
    (["--height", "-8"], "--height: must be an integer >= 1"),
    (["--width", "1.5"], "--width: expected an integer"),
    (["--seed", "-1"], "--seed: must be an integer >= 0"),
    (["--device", "gpu0"], "--device: expected cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device: the demo runs on cpu or cuda"),
    (["--backend", "fast"], "--backend: invalid choice"),
    (["--batch", "64", "--height", "4096", "--width", "4096"], "the demo takes at most 268,435,456"),
    (["--backend", "cuda", "--device", "cpu"], "--backend cuda on cpu: backend='cuda' needs cuda tensors"),
]


@pytest.mark.parametrize("options, message", BAD_DEMO_OPTIONS, ids=[" ".join(o) for o, _ in BAD_DEMO_OPTIONS])
def test_demo_bad_options(capsys, options, message):
    code, out, err = run(["demo", *options], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
def test_demo_without_a_gpu(capsys):
    code, out, err = run(["--device", "cuda"], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, "--device: cuda: no CUDA device is available here")
    # --backend triton on the CPU, without the interpreter the tests set up (conftest: TRITON_INTERPRET=1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "blv_kernels", "--backend", "triton"], capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line_error(proc.stderr, "--backend triton on cpu: backend='triton' runs on CUDA tensors")


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_explains_every_option_in_plain_text():
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, (parser.prog, action.dest)
        text = parser.format_help()
        for markup in ("``", ":func:", ":class:", ":mod:", "::\n"):
            assert markup not in text, (parser.prog, markup)
    help_text = next(p for p in _parsers(build_parser()) if p.prog.endswith("count-classes")).format_help()
    assert "--pattern '*_labelTrainIds.png'" in help_text  # the Cityscapes pattern, documented
