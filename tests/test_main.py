"""The command line: the demo (the default command) and count-classes on real label files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from blv_kernels import BLVLoss
from blv_kernels.__main__ import main


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
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install 'blv_kernels[data]')")
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
