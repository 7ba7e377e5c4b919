"""Class counts from label maps: tensors and arrays, label files (PNG, .npy), the JSON format."""

import json

import numpy as np
import pytest
import torch

from blv_kernels import BLVLoss, class_weights
from blv_kernels.integrations import count_classes, count_label_files, load_counts, read_label, save_counts

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install 'blv_kernels[data]')")


def _labels(rng, n=3, num_classes=6, shape=(7, 9), ignore_index=255):
    maps = []
    for _ in range(n):
        label = torch.randint(0, num_classes, shape, generator=rng, dtype=torch.uint8)
        label[torch.rand(shape, generator=rng) < 0.2] = ignore_index
        maps.append(label)
    return maps


def _expected(maps, num_classes, ignore_index=255):
    flat = torch.cat([m.flatten().long() for m in maps])
    return torch.bincount(flat[flat != ignore_index], minlength=num_classes).tolist()


def test_count_classes_tensors_and_arrays(rng):
    maps = _labels(rng)
    expected = _expected(maps, 6)
    assert count_classes(maps, 6) == expected
    assert count_classes([m.numpy().astype(np.int32) for m in maps], 6) == expected
    negative_ignore = [torch.where(m == 255, -1, m.long()) for m in maps]  # int64 with a negative ignore_index
    assert count_classes(negative_ignore, 6, ignore_index=-1) == expected


def test_count_classes_rejects_out_of_range_labels(rng):
    maps = _labels(rng)
    maps[1][0, 0] = 6
    with pytest.raises(ValueError, match=r"label map 1 has values outside \[0, 6\).*\{6: 1\}"):
        count_classes(maps, 6)
    with pytest.raises(ValueError, match="must hold integers"):
        count_classes([torch.rand(3, 3, generator=rng)], 6)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        count_classes(maps, 0)


def test_read_label_formats(rng, tmp_path):
    label = _labels(rng, n=1)[0].numpy()
    Image.fromarray(label, mode="L").save(tmp_path / "gray.png")
    palette = Image.fromarray(label, mode="P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    palette.save(tmp_path / "palette.png")  # VOC-style: the indices are the labels, not the colours
    np.save(tmp_path / "label.npy", label.astype(np.int64))
    for name in ("gray.png", "palette.png", "label.npy"):
        np.testing.assert_array_equal(read_label(tmp_path / name), label)
    Image.fromarray(np.stack([label] * 3, axis=-1)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="single-channel label map"):
        read_label(tmp_path / "rgb.png")


@pytest.mark.parametrize("workers", [1, 2])
def test_count_label_files_reports_problems(rng, tmp_path, workers):
    maps = [m.numpy() for m in _labels(rng, n=4)]
    maps[2][0, :3] = 7  # out of range: reported, not counted
    for i, label in enumerate(maps[:3]):
        Image.fromarray(label).save(tmp_path / f"{i}.png")
    np.save(tmp_path / "3.npy", maps[3])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths = sorted(tmp_path.iterdir())
    result = count_label_files(paths, 6, 255, workers=workers, progress=False)
    maps[2][0, :3] = 255
    assert result.counts == _expected([torch.from_numpy(m) for m in maps], 6)
    assert result.files_counted == 4
    assert result.out_of_range == {str(tmp_path / "2.png"): {7: 3}}
    assert list(result.unreadable) == [str(tmp_path / "broken.png")]
    assert "UnidentifiedImageError" in result.unreadable[str(tmp_path / "broken.png")]


def test_counts_json_round_trip_into_blv_loss(rng, tmp_path):
    counts = [int(c) for c in torch.randint(1, 10**9, (6,), generator=rng)]
    path = tmp_path / "counts.json"
    save_counts(counts, path)
    assert json.loads(path.read_text()) == counts  # a plain JSON list: BLVLoss(json.load(f)) works
    assert load_counts(path) == counts
    torch.testing.assert_close(BLVLoss(load_counts(path)).variation_weight, class_weights(counts))
    path.write_text(json.dumps({"counts": counts}))
    with pytest.raises(ValueError, match="non-empty JSON list of non-negative integers"):
        load_counts(path)
