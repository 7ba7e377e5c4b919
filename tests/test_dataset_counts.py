"""Class counts from label maps: tensors and arrays, label files (PNG, .npy), the JSON format."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blv_kernels import BLVLoss, class_weights
from blv_kernels.integrations import (
    ClassCounter,
    count_classes,
    count_label_files,
    find_label_files,
    load_counts,
    read_label,
    save_counts,
)
from blv_kernels.integrations.dataset_counts import MAX_CLASSES

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
    # (numpy's TypeError for bfloat16, its inhomogeneous-shape error, torch's "Cannot copy out of meta tensor")
    for bad, message in ((torch.ones(3, dtype=torch.bfloat16), "label map 0 must hold integers, got dtype torch.bfloat16"),
                         ([[1], [1, 2]], "label map 0 must be an array of integers, got a ragged sequence"),
                         (torch.ones(3, dtype=torch.long, device="meta"), "label map 0 is a meta tensor")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            count_classes([bad], 6)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        count_classes(maps, 0)
    with pytest.raises(ValueError, match=f"num_classes must be an integer >= 1 and <= {MAX_CLASSES}"):
        count_classes(maps, 10**9)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        count_classes(maps, 6, ignore_index=255.0)


def test_count_classes_refuses_sparse_nested_tensors_and_non_iterables(rng):
    """Named errors, not torch's ("can't convert Sparse layout tensor to numpy", "NestedTensorImpl doesn't
    support sizes") or Python's "'int' object is not iterable"."""
    label = _labels(rng, n=1)[0].long()
    for layout, bad in (("sparse_coo", label.to_sparse()),
                        ("nested", torch.nested.as_nested_tensor([label], layout=torch.jagged))):  # fmt: skip
        with pytest.raises(TypeError, match=f"^label map 1 must be a dense .strided. tensor, got a {layout} one$"):
            count_classes([label, bad], 6)
    for bad, kind in ((5, "int"), (None, "NoneType"), (torch.tensor(5), "Tensor")):  # (a 0-d tensor has no maps)
        with pytest.raises(
            TypeError, match=f"^labels must be an iterable of label maps .tensors or arrays., got {kind}$"
        ):
            count_classes(bad, 6)


def test_numpy_scalar_arguments(rng):
    maps = _labels(rng)
    assert count_classes(maps, np.int64(6), ignore_index=np.uint8(255)) == _expected(maps, 6)


@pytest.mark.parametrize("ignore_index", [0, 3])
def test_ignore_index_inside_the_classes_is_not_counted(rng, tmp_path, ignore_index):
    """An ignore label inside [0, C) (e.g. ADE20K's 0 as "other") is excluded everywhere, as ClassCounter does."""
    maps = [torch.randint(0, 6, (7, 9), generator=rng, dtype=torch.uint8) for _ in range(3)]
    expected = _expected(maps, 6, ignore_index=ignore_index)
    assert expected[ignore_index] == 0 and sum(expected) > 0
    assert count_classes(maps, 6, ignore_index=ignore_index) == expected
    counter = ClassCounter(6, ignore_index=ignore_index)
    for label in maps:
        counter.update(label)
    assert counter.counts().long().tolist() == expected
    for i, label in enumerate(maps):
        Image.fromarray(label.numpy()).save(tmp_path / f"{i}.png")
    result = count_label_files(sorted(tmp_path.iterdir()), 6, ignore_index, workers=1, progress=False)
    assert result.counts == expected and result.out_of_range == {}


def test_values_beyond_int64_are_reported_as_they_are(rng, tmp_path):
    label = torch.randint(0, 6, (5, 8), generator=rng).numpy().astype(np.uint64)
    huge = 2**63 + int(torch.randint(0, 2**62, (), generator=rng))
    label[0, :3] = huge
    np.save(tmp_path / "huge.npy", label)
    result = count_label_files([tmp_path / "huge.npy"], 6, 255, workers=1, progress=False)
    assert result.out_of_range == {str(tmp_path / "huge.npy"): {huge: 3}}
    label[0, :3] = 255
    assert result.counts == _expected([torch.from_numpy(label.astype(np.int64))], 6)


def test_many_classes_are_counted_sparsely(rng, tmp_path):
    """The bound on the classes (a count per class is written out) and no per-file array of C counts."""
    values = torch.randint(0, MAX_CLASSES, (4, 50), generator=rng)
    for i, label in enumerate(values):
        np.save(tmp_path / f"{i}.npy", label.numpy().astype(np.int32).reshape(5, 10))
    result = count_label_files(sorted(tmp_path.iterdir()), MAX_CLASSES, -1, workers=2, progress=False)
    assert result.counts == torch.bincount(values.flatten(), minlength=MAX_CLASSES).tolist()
    with pytest.raises(ValueError, match=f"<= {MAX_CLASSES}"):
        count_label_files(sorted(tmp_path.iterdir()), MAX_CLASSES + 1, workers=1, progress=False)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        count_label_files(sorted(tmp_path.iterdir()), 6, workers=0, progress=False)


def test_one_bit_masks_are_labels_0_and_1(rng, tmp_path):
    mask = (torch.rand(9, 14, generator=rng) < 0.3).numpy()
    Image.fromarray(mask).convert("1").save(tmp_path / "mask.png")
    assert Image.open(tmp_path / "mask.png").mode == "1"
    np.testing.assert_array_equal(read_label(tmp_path / "mask.png"), mask.astype(np.uint8))
    result = count_label_files([tmp_path / "mask.png"], 2, workers=1, progress=False)
    assert result.counts == [int((~mask).sum()), int(mask.sum())]


def _cityscapes_tree(root, rng, kinds):
    """gtFine-like files: city/frame_gtFine{kind}.png for each kind."""
    for city in ("aachen", "bochum"):
        (root / city).mkdir(parents=True)
        for frame in range(2):
            for kind in kinds:
                label = torch.randint(0, 19, (4, 6), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(label).save(root / city / f"{city}_{frame:06d}_gtFine{kind}.png")


def test_find_label_files_refuses_several_cityscapes_kinds(rng, tmp_path):
    _cityscapes_tree(tmp_path, rng, ["_labelTrainIds", "_labelIds", "_color", "_instanceIds"])
    with pytest.raises(ValueError, match="label maps of 4 kinds") as refused:
        find_label_files(tmp_path)
    for kind in ("_labelTrainIds", "_labelIds", "_color", "_instanceIds"):
        assert f"4 *{kind}.png" in str(refused.value)
    assert "'*_labelTrainIds.png'" in str(refused.value)  # what to pass instead
    with pytest.raises(ValueError, match="label maps of 3 kinds"):
        find_label_files(tmp_path, "*Ids.png")  # labelTrainIds, labelIds and instanceIds
    train_ids = find_label_files(tmp_path, "*_labelTrainIds.png")
    assert len(train_ids) == 4 and all(p.name.endswith("_gtFine_labelTrainIds.png") for p in train_ids)
    assert train_ids == sorted(train_ids)


def test_find_label_files_takes_one_kind_and_plain_names(rng, tmp_path):
    _cityscapes_tree(tmp_path / "cityscapes", rng, ["_labelTrainIds"])
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "ADE_train_00000001.png")
    assert len(find_label_files(tmp_path)) == 5  # one Cityscapes kind beside other names: nothing mixed
    with pytest.raises(ValueError, match="is not a directory"):
        find_label_files(tmp_path / "ADE_train_00000001.png")
    with pytest.raises(ValueError, match="no files matching"):
        find_label_files(tmp_path, "*.npy")
    with pytest.raises(ValueError, match="invalid pattern"):
        find_label_files(tmp_path, "/abs/*.png")


def test_find_label_files_refuses_a_file_found_twice_through_a_link(rng, tmp_path):
    """all/a.png and train/a.png -> ../all/a.png: count_label_files would refuse the list; which name counts
    is not for find_label_files to choose."""
    label = _labels(rng, n=1)[0].numpy()
    (tmp_path / "all").mkdir()
    (tmp_path / "train").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(label).save(tmp_path / "all" / name)
    (tmp_path / "train" / "a.png").symlink_to(Path("..") / "all" / "a.png")
    message = f"^1 file.s. under {re.escape(str(tmp_path))} are found through more than one path .a symbolic link., "
    with pytest.raises(ValueError, match=message + f"e.g. {re.escape(str(tmp_path / 'all' / 'a.png'))}: "):
        find_label_files(tmp_path)
    assert find_label_files(tmp_path / "train") == [tmp_path / "train" / "a.png"]  # each file once: taken


def test_missing_pillow_or_tqdm_fails_before_reading(rng, tmp_path, monkeypatch):
    label = _labels(rng, n=1)[0].numpy()
    for i in range(3):
        Image.fromarray(label).save(tmp_path / f"{i}.png")
    np.save(tmp_path / "3.npy", label)
    paths = sorted(tmp_path.iterdir())
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    assert count_label_files(paths, 6, workers=1, progress=False).files_counted == 4  # no bar, no tqdm needed
    with pytest.raises(ImportError, match="progress bar needs tqdm.*progress=False"):
        count_label_files(paths, 6, workers=1, progress=True)
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match="reading label images needs Pillow"):
        count_label_files(paths, 6, workers=1, progress=False)
    assert count_label_files(paths[3:], 6, workers=1, progress=False).counts == _expected([torch.from_numpy(label)], 6)


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


def test_count_label_files_takes_each_file_once(rng, tmp_path):
    label = _labels(rng, n=1)[0].numpy()
    for i in range(3):
        Image.fromarray(label).save(tmp_path / f"{i}.png")
    paths = sorted(tmp_path.iterdir())
    # an iterator is read once: the check for Pillow must not take its first file
    result = count_label_files(iter(paths), 6, workers=1, progress=False)
    assert result.files_counted == 3 and result.counts == _expected([torch.from_numpy(label)] * 3, 6)
    for twice in (
        [tmp_path / "nope.npy", tmp_path / "nope.npy"],
        [paths[0], *paths],
        [paths[1], f"{tmp_path}/./1.png"],
    ):
        with pytest.raises(ValueError, match="paths lists 1 file.s. more than once, e.g. .*: each file counts once"):
            count_label_files(twice, 6, workers=1, progress=False)
    for single in (str(paths[0]), paths[0], bytes(paths[0])):
        with pytest.raises(TypeError, match="paths must be a sequence of label files, got the single path"):
            count_label_files(single, 6, workers=1, progress=False)


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
    path.write_text(json.dumps([True, *counts[1:]]))
    with pytest.raises(ValueError, match="non-empty JSON list of non-negative integers"):
        load_counts(path)


def test_save_counts_never_leaves_half_a_file(rng, tmp_path, monkeypatch):
    counts = torch.randint(0, 10**6, (5,), generator=rng).tolist()
    path = tmp_path / "counts.json"
    path.write_text("[1, 2]\n")

    def full_disk(self, target):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(OSError, match=f"No space left on device: '{re.escape(str(path))}'"):  # the file asked for
        save_counts(counts, path)
    assert [p.name for p in tmp_path.iterdir()] == ["counts.json"] and load_counts(path) == [1, 2]  # as it was
    monkeypatch.undo()
    save_counts(counts, path)
    assert load_counts(path) == counts


def test_save_counts_writes_through_a_symlink_and_refuses_special_files(tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("[1]\n")
    link.symlink_to(real)
    save_counts([3, 4], link)
    assert link.is_symlink() and load_counts(real) == [3, 4]
    os.mkfifo(tmp_path / "pipe")  # (a device such as /dev/null was replaced by a regular file)
    for special, problem in ((tmp_path / "pipe", "is not a regular file"), (tmp_path, "is a directory")):
        with pytest.raises(ValueError, match=f"^{re.escape(str(special))} {problem}"):
            save_counts([3, 4], special)
    assert (tmp_path / "pipe").is_fifo()
    long_name = tmp_path / ("c" * 250 + ".json")  # 255 bytes: its temporary file's name must still fit
    save_counts([5], long_name)
    assert load_counts(long_name) == [5]


@pytest.mark.parametrize(
    "counts, problem",
    [([1.9, 3], "item 0 is 1.9"), ([5, -3], "item 1 is -3"), ([], "got an empty list"), ([2, True], "item 1 is True"),
     ({"road": 3}, "got a dict")],
)  # fmt: skip
def test_save_counts_refuses_what_load_counts_refuses(counts, problem, tmp_path):
    path = tmp_path / "counts.json"
    rule = re.escape(f"non-negative integers (pixel counts per class): {problem}")
    with pytest.raises(ValueError, match=f"^counts must be a non-empty list of {rule}$"):
        save_counts(counts, path)
    assert not any(tmp_path.iterdir())  # nothing written
    path.write_text(json.dumps(counts))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} must hold a non-empty JSON list of {rule}$"):
        load_counts(path)


def test_save_counts_takes_integer_arrays_and_tensors(tmp_path):
    path = tmp_path / "counts.json"
    counter = ClassCounter(3)
    counter.update(torch.tensor([0, 0, 2, 2, 2, 2, 2, 2, 2]))
    for counts in (np.array([3, 0, 7], dtype=np.uint32), torch.tensor([3, 0, 7]), (3, 0, np.int64(7)), [3.0, 0, 7],
                   [np.float32(3), torch.tensor(0), torch.tensor([7.0])],
                   counter.counts() + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)):  # fmt: skip
        save_counts(counts, path)  # whole floats (ClassCounter's float64 counts) are written as integers
        assert load_counts(path) == [3, 0, 7]
        assert path.read_text() == "[3, 0, 7]\n"
    for counts, problem in ((np.array([3.0, 0.5]), "item 1 is 0.5"), (torch.tensor([3, -1]), "item 1 is -1")):
        with pytest.raises(ValueError, match=re.escape(problem)):
            save_counts(counts, path)
    assert load_counts(path) == [3, 0, 7]  # the file is as it was


def test_save_counts_refuses_tensors_without_dense_values(tmp_path):
    """Not torch's "Cannot copy out of meta tensor" or its errors from inside sparse and nested tensors."""
    path = tmp_path / "counts.json"
    counts = torch.tensor([3, 0, 7])
    for bad, error, message in (
        (counts.to("meta"), ValueError, "counts is a meta tensor: it holds no counts"),
        (counts.to_sparse(), TypeError, "counts must be a dense .strided. tensor, got a sparse_coo one"),
        (torch.nested.as_nested_tensor([counts], layout=torch.jagged), TypeError,
         "counts must be a dense .strided. tensor, got a nested one"),
    ):  # fmt: skip
        with pytest.raises(error, match=f"^{message}$"):
            save_counts(bad, path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_counts_file_errors_name_the_file_asked_for(tmp_path):
    missing = tmp_path / "missing" / "counts.json"
    with pytest.raises(FileNotFoundError) as error:
        save_counts([1, 2], missing)
    assert error.value.filename == str(missing)  # not the temporary file beside it
    assert not (tmp_path / "missing").exists()
    malformed = tmp_path / "counts.json"
    malformed.write_text("[1, 2")
    with pytest.raises(ValueError, match=f"^{re.escape(str(malformed))} is not valid JSON: Expecting"):
        load_counts(malformed)
    malformed.write_text("[" * 100_000 + "]" * 100_000)  # (a RecursionError from json)
    with pytest.raises(ValueError, match=f"^{re.escape(str(malformed))} is not valid JSON: maximum recursion"):
        load_counts(malformed)
