"""Mask encodings (0/255 refusal, declared values) and the VOC/Cityscapes split policy: official
val is the test set only, validation is carved from official train, pairs are read lazily."""
import json

import numpy as np
import pytest
from PIL import Image

from ernas.errors import ErnasError
from ernas.task import make_task
from ernas.tasks.segment.data import PairFiles
from ernas.tasks.segment.official import carve_validation

H, W = 12, 16


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def _rgb(seed):
    return (np.random.default_rng(seed).random((H, W, 3)) * 255).astype(np.uint8)


def _binary_folder(root, foreground=255):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[3:8, 4:10] = foreground
    for split in ("train", "val", "test"):
        _save(root / split / "images" / "a.png", _rgb(0))
        _save(root / split / "masks" / "a.png", mask)
    return mask


def test_undeclared_0_255_masks_are_refused_with_how_to_declare(tmp_path):
    """Fails if 255 in a two-class 0/255 mask is silently read as ignore."""
    _binary_folder(tmp_path)
    task = make_task({"name": "segment", "data": "folder", "root": str(tmp_path),
                      "num_classes": 2})
    with pytest.raises(ErnasError) as info:
        task.dataset("train")
    text = str(info.value)
    assert "a.png" in text and "task.binary=true" in text and "task.mask_values=[0,1]" in text


def test_binary_true_maps_255_to_foreground(tmp_path):
    """Fails if binary=true does not make 255 class 1 (or loses the foreground)."""
    mask = _binary_folder(tmp_path)
    task = make_task({"name": "segment", "data": "folder", "root": str(tmp_path),
                      "binary": True})
    assert task.classes == ("class_0", "class_1")
    target = task.dataset("test")[0]["target"].numpy()
    np.testing.assert_array_equal(target, (mask == 255).astype(np.int64))


def test_mask_values_declare_encodings_and_refuse_the_rest(tmp_path):
    """Fails if declared values are not mapped in order, if 255 stops being ignore when not
    listed, or if an undeclared value passes."""
    mask = _binary_folder(tmp_path, foreground=1)
    mask[0, 0] = 255
    _save(tmp_path / "train" / "masks" / "a.png", mask)
    task = make_task({"name": "segment", "data": "folder", "root": str(tmp_path),
                      "mask_values": [0, 1]})
    target = task.dataset("train")[0]["target"].numpy()
    assert target[0, 0] == 255 and target[4, 5] == 1 and target[1, 1] == 0
    task = make_task({"name": "segment", "data": "folder", "root": str(tmp_path),
                      "mask_values": [0, 128]})
    with pytest.raises(ErnasError, match=r"holds values 1,.*\[0, 128\]"):
        task.dataset("train")
    for bad in ({"mask_values": [0, 255], "num_classes": 3}, {"mask_values": [0, 0]},
                {"binary": True, "mask_values": [1, 2]}, {"mask_values": "0,255"}):
        with pytest.raises(ErnasError, match="mask_values"):
            make_task({"name": "segment", "data": "folder", "root": str(tmp_path), **bad})
    with pytest.raises(ErnasError, match="folder only"):
        make_task({"name": "segment", "data": "brain", "binary": True})


# --------------------------------------------------------------------------- official sets


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOC2012"
    stems = {"train": [f"2007_{i:06d}" for i in range(10)],
             "val": [f"2008_{i:06d}" for i in range(3)]}
    for i, stem in enumerate(stems["train"] + stems["val"]):
        _save(root / "JPEGImages" / f"{stem}.jpg", _rgb(i))
        _save(root / "SegmentationClass" / f"{stem}.png",
              np.random.default_rng(i).integers(0, 21, (H, W)))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, names in stems.items():
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root, stems


@pytest.fixture
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    ids = {"train": [("aachen", f"aachen_{i:06d}_000019") for i in range(6)]
           + [("bremen", f"bremen_{i:06d}_000019") for i in range(4)],
           "val": [("frankfurt", f"frankfurt_{i:06d}_000019") for i in range(2)]}
    for split, frames in ids.items():
        for i, (city, frame) in enumerate(frames):
            _save(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", _rgb(i))
            _save(root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png",
                  np.random.default_rng(i).integers(0, 34, (H, W)))
    return root, {s: [f for _, f in frames] for s, frames in ids.items()}


@pytest.mark.parametrize("data", ["voc", "cityscapes"])
def test_official_val_is_test_only_and_validation_is_carved_from_train(data, voc, cityscapes,
                                                                        tmp_path):
    """Fails if test maps to a split that also selects, if a file is in two splits, if the carve
    is not seeded, or if the lists are not written into the run directory."""
    root, official = voc if data == "voc" else cityscapes
    task = make_task({"name": "segment", "data": data, "root": str(root), "val_fraction": 0.2})
    names = {s: [p.name for p in task.samples(s)] for s in ("train", "val", "test")}
    assert sorted(names["test"]) == sorted(official["val"])
    assert len(names["val"]) == 2 and set(names["val"]) <= set(official["train"])
    assert sorted(names["train"] + names["val"]) == sorted(official["train"])
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(names[a]) & set(names[b])
    assert all(isinstance(p, PairFiles) for p in task.samples("train"))  # lazy, not decoded
    again = make_task({"name": "segment", "data": data, "root": str(root), "val_fraction": 0.2})
    assert [p.name for p in again.samples("val")] == names["val"]
    other = make_task({"name": "segment", "data": data, "root": str(root), "val_fraction": 0.2,
                       "split_seed": 3})
    assert {p.name for p in other.samples("val")} != set(names["val"])
    task.record_splits(tmp_path / "run")
    written = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert {s: written[s] for s in ("train", "val", "test")} == names
    item = task.dataset("test")[0]
    assert item["input"].shape == (3, H, W) and item["name"] == names["test"][0]


def test_carve_validation_checks_its_inputs():
    """Fails if a bad fraction or a one-image train split is accepted."""
    assert carve_validation(list("abcdefghij"), 0.3, 0) == carve_validation(list("jihgfedcba"),
                                                                           0.3, 0)
    with pytest.raises(ErnasError, match="val_fraction"):
        carve_validation(["a", "b"], 1.0, 0)
    with pytest.raises(ErnasError, match="at least 2"):
        carve_validation(["a"], 0.5, 0)


def test_lazy_pairs_report_a_bad_file_when_read(voc):
    """Fails if a damaged file is read silently instead of reported with its name."""
    root, official = voc
    task = make_task({"name": "segment", "data": "voc", "root": str(root)})
    (root / "JPEGImages" / f"{official['val'][0]}.jpg").write_bytes(b"broken")
    ds = task.dataset("test")
    with pytest.raises(ErnasError, match=official["val"][0]):
        ds[0]


def test_cli_refuses_undeclared_binary_masks_before_writing(tmp_path):
    """Fails if ernas-retrain trains on 0/255 masks read as ignore, or writes into its run
    directory before refusing them."""
    import subprocess
    import sys

    _binary_folder(tmp_path / "data")
    (tmp_path / "arch.yaml").write_text(
        "family: unet\nname: u2\ngeometry: {in_channels: 3, num_classes: 2, width: 4, "
        "enc_blk_nums: [1], middle_blk_num: 1, dec_blk_nums: [1]}\n")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ernas.cli.retrain", "task=segment",
                        "task.data=folder", f"task.root={tmp_path / 'data'}", "task.num_classes=2",
                        f"arch={tmp_path / 'arch.yaml'}", "steps=1", "batch_size=1", "crop=8",
                        "progress=false", f"hydra.run.dir={out}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error:" in r.stderr and "task.binary=true" in r.stderr
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".log"
                and ".hydra" not in p.parts and p.name != ".ernas.lock"]
