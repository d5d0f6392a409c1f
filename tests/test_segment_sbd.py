"""SBD as extra VOC training data: images of VOC val (the test set) or of the carved validation
never enter train, ids also in VOC train are taken once with VOC's mask, SBD class maps arrive
intact from their .mat files, and bad settings are refused before anything is written."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import sparse
from scipy.io import loadmat, savemat

from ernas.errors import ErnasError
from ernas.task import make_task
from ernas.tasks.segment.official import SbdPairFiles

H, W = 12, 16
SBD_H, SBD_W = 10, 14  # SBD images of another size than the VOC ones
VOC_TRAIN = [f"2007_{i:06d}" for i in range(10)]
VOC_VAL = [f"2008_{i:06d}" for i in range(3)]
SBD_NEW = [f"2011_{i:06d}" for i in range(4)]
SBD_TRAIN = VOC_TRAIN[:2] + VOC_VAL[:1] + SBD_NEW[:2]
SBD_VAL = VOC_TRAIN[2:4] + VOC_VAL[1:2] + SBD_NEW[2:]


def _rgb(seed, h=H, w=W):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _sbd_mask(i):
    """A class map holding classes 0, 15 and 20 (the last VOC class) in blocks."""
    mask = np.zeros((SBD_H, SBD_W), dtype=np.uint8)
    mask[: SBD_H // 2, i % 3:] = 15
    mask[SBD_H // 2:, : SBD_W // 2] = 20
    return mask


def _save_mat(path, segmentation):
    """An SBD cls/<id>.mat file: struct GTcls with Segmentation, Boundaries (20 sparse maps) and
    CategoriesPresent, as the release stores them."""
    bounds = np.empty((20, 1), dtype=object)
    for k in range(20):
        bounds[k, 0] = sparse.csc_matrix((segmentation == k + 1).astype(np.uint8))
    present = np.unique(segmentation[segmentation > 0]).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"GTcls": {"Segmentation": segmentation, "Boundaries": bounds,
                             "CategoriesPresent": present}})


@pytest.fixture
def data(tmp_path):
    voc = tmp_path / "VOC2012"
    for i, stem in enumerate(VOC_TRAIN + VOC_VAL):
        _save(voc / "JPEGImages" / f"{stem}.jpg", _rgb(i))
        _save(voc / "SegmentationClass" / f"{stem}.png",
              np.random.default_rng(i).integers(0, 5, (H, W)))  # VOC masks: classes 0..4 only
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (lists / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    sbd = tmp_path / "benchmark_RELEASE"
    ids = SBD_TRAIN + SBD_VAL
    for i, name in enumerate(ids):
        _save(sbd / "dataset" / "img" / f"{name}.jpg", _rgb(100 + i, SBD_H, SBD_W))
        _save_mat(sbd / "dataset" / "cls" / f"{name}.mat", _sbd_mask(i))
    (sbd / "dataset" / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (sbd / "dataset" / "val.txt").write_text("\n".join(SBD_VAL) + "\n")
    return voc, sbd


def _task(voc, sbd, **extra):
    return make_task({"name": "segment", "data": "voc", "root": str(voc), "sbd_root": str(sbd),
                      "val_fraction": 0.2, **extra})


def test_mat_files_read_back_as_the_release_reads_them(data):
    """Fails if the fixture's .mat files do not have the SBD struct layout."""
    _, sbd = data
    path = sbd / "dataset" / "cls" / f"{SBD_NEW[0]}.mat"
    seg = loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    np.testing.assert_array_equal(seg, _sbd_mask(SBD_TRAIN.index(SBD_NEW[0])))
    raw = loadmat(path)["GTcls"][0]["Segmentation"][0]  # torchvision's SBDataset access path
    np.testing.assert_array_equal(raw, seg)


def test_sbd_joins_train_only_outside_val_and_test(data, tmp_path):
    """Fails if an SBD image of VOC val or of the carved validation enters train, if an id in
    both sets is taken twice or with SBD's mask, or if the counts are not recorded."""
    voc, sbd = data
    task = _task(voc, sbd)
    names = {s: [p.name for p in task.samples(s)] for s in ("train", "val", "test")}
    assert sorted(names["test"]) == VOC_VAL and len(names["val"]) == 2
    assert not set(names["train"]) & (set(names["val"]) | set(names["test"]))
    assert len(names["train"]) == len(set(names["train"]))
    kept_voc = [n for n in VOC_TRAIN if n not in names["val"]]
    assert sorted(names["train"]) == sorted(kept_voc + SBD_NEW)
    shared = [n for n in VOC_TRAIN[:4] if n not in names["val"]]
    by_name = {p.name: p for p in task.samples("train")}
    assert all(not isinstance(by_name[n], SbdPairFiles) for n in shared)  # VOC's pair wins
    assert all(isinstance(by_name[n], SbdPairFiles) for n in SBD_NEW)
    task.record_splits(tmp_path / "run")
    written = json.loads((tmp_path / "run" / "splits.json").read_text())
    carved = 4 - len(shared)  # SBD ids of VOC train that were carved into validation
    assert written["sbd"] == {"root": str(sbd), "voc_train": 8, "sbd_listed": 10, "sbd_added": 4,
                              "sbd_excluded_val_or_test": 2 + carved,
                              "sbd_already_in_voc_train": len(shared)}
    assert written["train"] == names["train"]
    again = _task(voc, sbd / "dataset")  # the dataset/ folder itself is accepted too
    assert [p.name for p in again.samples("train")] == names["train"]


def test_sbd_class_maps_arrive_intact(data):
    """Fails if an SBD mask's classes (up to 20) are lost, remapped or resized on the way, or if
    a shared id is read with SBD's mask instead of VOC's."""
    voc, sbd = data
    task = _task(voc, sbd)
    ds = task.dataset("train")  # evaluation mode: whole images, no randomness
    names = [p.name for p in task.samples("train")]
    for name in SBD_NEW:
        item = ds[names.index(name)]
        expect = _sbd_mask((SBD_TRAIN + SBD_VAL).index(name))
        np.testing.assert_array_equal(item["target"].numpy(), expect)
        assert item["input"].shape == (3, SBD_H, SBD_W)
    shared = next(n for n in VOC_TRAIN[:4] if n in names)
    target = ds[names.index(shared)]["target"].numpy()
    assert target.shape == (H, W) and target.max() <= 4  # VOC's png, not the SBD map
    assert set(np.unique(ds[names.index(SBD_NEW[0])]["target"].numpy())) == {0, 15, 20}


def test_sbd_root_is_refused_with_other_data_or_without_its_files(data):
    """Fails if sbd_root is accepted for data other than VOC or a folder missing its SBD files
    passes, or if the message does not name task.sbd_root."""
    voc, sbd = data
    with pytest.raises(ErnasError, match=r"task\.sbd_root.*task\.data=shapes"):
        make_task({"name": "segment", "data": "shapes", "sbd_root": str(sbd)})
    with pytest.raises(ErnasError, match=r"task\.sbd_root"):
        make_task({"name": "segment", "data": "voc", "root": str(voc), "sbd_root": ""})
    with pytest.raises(ErnasError, match=r"task\.sbd_root.*not an existing folder"):
        _task(voc, sbd / "nowhere").samples("train")
    with pytest.raises(ErnasError, match=r"task\.sbd_root.*dataset/img"):
        _task(voc, voc).samples("train")
    (sbd / "dataset" / "cls" / f"{SBD_NEW[3]}.mat").unlink()
    with pytest.raises(ErnasError, match=rf"task\.sbd_root: 1 mask files.*{SBD_NEW[3]}\.mat"):
        _task(voc, sbd).samples("train")
    (sbd / "dataset" / "val.txt").unlink()
    with pytest.raises(ErnasError, match=r"task\.sbd_root: the SBD split list .*val\.txt"):
        _task(voc, sbd).samples("train")


def test_a_damaged_mat_file_is_named_when_read(data):
    """Fails if a .mat file without GTcls.Segmentation is read silently."""
    voc, sbd = data
    savemat(sbd / "dataset" / "cls" / f"{SBD_NEW[0]}.mat", {"GTinst": np.zeros((2, 2))})
    task = _task(voc, sbd)
    ds = task.dataset("train")
    with pytest.raises(ErnasError, match=rf"{SBD_NEW[0]}\.mat.*GTcls"):
        ds[[p.name for p in task.samples("train")].index(SBD_NEW[0])]


def test_cli_refuses_a_bad_sbd_folder_before_writing(data, tmp_path):
    """Fails if ernas-retrain starts with an SBD folder missing its files, exits other than 2,
    or writes into its run directory first."""
    voc, sbd = data
    (sbd / "dataset" / "train.txt").unlink()
    (tmp_path / "arch.yaml").write_text(
        "family: unet\nname: u21\ngeometry: {in_channels: 3, num_classes: 21, width: 4, "
        "enc_blk_nums: [1], middle_blk_num: 1, dec_blk_nums: [1]}\n")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ernas.cli.retrain", "task=segment",
                        "task.data=voc", f"task.root={voc}", f"task.sbd_root={sbd}",
                        f"arch={tmp_path / 'arch.yaml'}", "steps=1", "batch_size=1", "crop=8",
                        "progress=false", f"hydra.run.dir={out}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("error:") == 1 and "task.sbd_root" in r.stderr
    assert "train.txt" in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".log"
                and ".hydra" not in p.parts and p.name != ".ernas.lock"]
