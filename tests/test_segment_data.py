import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from ernas.tasks.segment import brain as brain_module
from ernas.tasks.segment import shapes as shapes_module
from ernas.tasks.segment.brain import BRAIN_CLASSES, BRAIN_SLABS, brain_slices
from ernas.tasks.segment.data import IGNORE_INDEX, SegmentationDataset, read_mask, \
    segmentation_folders
from ernas.tasks.segment.official import CITYSCAPES_TRAIN_IDS, cityscapes_samples, voc_samples
from ernas.tasks.segment.shapes import SHAPE_CLASSES, SHAPES_SPLIT_SIZES, shape_samples
from ernas.task import make_task
from ernas.errors import ErnasError

H, W = 24, 32


def _rgb(seed=0, h=H, w=W):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _save_rgb(path, seed=0, h=H, w=W):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(seed, h, w)).save(path)


def _voc_palette():
    """The Pascal VOC colour map: index i -> (r, g, b) from the bits of i."""
    pal = []
    for i in range(256):
        r = g = b = 0
        for j in range(8):
            r |= ((i >> (3 * j)) & 1) << (7 - j)
            g |= ((i >> (3 * j + 1)) & 1) << (7 - j)
            b |= ((i >> (3 * j + 2)) & 1) << (7 - j)
        pal += [r, g, b]
    return pal


def _save_mask(path, mask, palette=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    if palette:
        im.putpalette(_voc_palette())
    im.save(path)


def _voc_mask(seed):
    mask = np.random.default_rng(seed).integers(0, 21, (H, W))
    mask[0] = IGNORE_INDEX  # object borders
    mask[1, :4] = 15        # person: palette colour (192, 128, 128), index 15
    return mask


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOC2012"
    for i, stem in enumerate(["2007_000032", "2007_000039", "2007_000063"]):
        _save_rgb(root / "JPEGImages" / f"{stem}.jpg", i)
        _save_mask(root / "SegmentationClass" / f"{stem}.png", _voc_mask(i))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000032\n2007_000039\n")
    (lists / "val.txt").write_text("2007_000063\n")
    return root


@pytest.fixture
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    ids = np.arange(H * W).reshape(H, W) % 34  # every label id 0..33
    for city, frame in [("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")]:
        _save_rgb(root / "leftImg8bit" / "train" / city / f"{frame}_leftImg8bit.png")
        _save_mask(root / "gtFine" / "train" / city / f"{frame}_gtFine_labelIds.png", ids, False)
    return root, ids


@pytest.fixture
def folders(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for i, stem in enumerate(["a", "b"]):
        _save_rgb(images / f"{stem}.png", i)
        _save_mask(masks / f"{stem}.png", np.random.default_rng(i).integers(0, 3, (H, W)), False)
    return images, masks


# --------------------------------------------------------------------------- readers


def test_voc_keeps_palette_indices_and_ignore(voc):
    train = voc_samples(voc, "train")
    assert [name for name, _, _ in train] == ["2007_000032", "2007_000039"]
    for i, (_, image, mask) in enumerate(train):
        assert image.shape == (H, W, 3) and image.dtype == np.float32
        assert 0 <= image.min() and image.max() <= 1
        assert mask.dtype == np.int64
        np.testing.assert_array_equal(mask, _voc_mask(i))
    assert len(voc_samples(voc, "val")) == 1
    item = SegmentationDataset(train, 21, train=False)[1]
    assert item["input"].shape == (3, H, W) and item["input"].dtype == torch.float32
    assert item["target"].dtype == torch.int64
    np.testing.assert_array_equal(item["target"].numpy(), _voc_mask(1))


def test_cityscapes_maps_label_ids_to_train_ids(cityscapes):
    root, ids = cityscapes
    samples = cityscapes_samples(root, "train")
    assert [name for name, _, _ in samples] == ["aachen_000000_000019", "bremen_000001_000019"]
    _, image, mask = samples[0]
    assert image.shape == (H, W, 3) and mask.shape == (H, W) and mask.dtype == np.int64
    expected = np.vectorize(lambda v: CITYSCAPES_TRAIN_IDS.get(int(v), IGNORE_INDEX))(ids)
    np.testing.assert_array_equal(mask, expected)
    lookup = dict(zip(ids.ravel().tolist(), mask.ravel().tolist()))
    assert (lookup[7], lookup[8], lookup[26], lookup[33]) == (0, 1, 13, 18)
    assert lookup[0] == lookup[6] == lookup[29] == IGNORE_INDEX
    assert sorted(set(mask.ravel().tolist()) - {IGNORE_INDEX}) == list(range(19))


def test_folder_pair(folders):
    images, masks = folders
    samples = segmentation_folders(images, masks, num_classes=3)
    assert [name for name, _, _ in samples] == ["a", "b"]
    np.testing.assert_array_equal(samples[1][2], np.random.default_rng(1).integers(0, 3, (H, W)))
    grey = segmentation_folders(images, masks, 3, color=False, max_side=16)
    assert grey[0][1].shape == (12, 16, 1) and grey[0][2].shape == (12, 16)
    assert set(np.unique(grey[0][2])) <= {0, 1, 2}


def _raises(fragments, fn, *args, **kwargs):
    with pytest.raises(ErnasError) as info:
        fn(*args, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_voc_bad_data(voc):
    mask = voc / "SegmentationClass" / "2007_000032.png"
    bad = _voc_mask(0)
    bad[5, 5], bad[6, 6] = 30, 200
    _save_mask(mask, bad)
    _raises(["2007_000032.png", "30, 200"], voc_samples, voc, "train")
    _save_mask(mask, np.zeros((H, W - 2)))
    _raises(["2007_000032.png", "24x32", "24x30"], voc_samples, voc, "train")
    mask.unlink()
    _raises(["2007_000032.png", "images without a mask"], voc_samples, voc, "train")
    (voc / "JPEGImages" / "2007_000063.jpg").unlink()
    _raises(["2007_000063.jpg"], voc_samples, voc, "val")
    _raises(["test.txt", "train, val"], voc_samples, voc, "test")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    _raises(["val.txt", "empty"], voc_samples, voc, "val")


def test_cityscapes_bad_data(cityscapes):
    root, ids = cityscapes
    image = root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    mask = root / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelIds.png"
    bad = ids.copy()
    bad[3, 3] = 40
    _save_mask(mask, bad, False)
    _raises(["bremen_000001_000019_gtFine_labelIds.png", "40"], cityscapes_samples, root)
    image.write_bytes(b"not a png")
    _raises(["aachen_000000_000019_leftImg8bit.png"], cityscapes_samples, root)
    image.unlink()
    _raises(["aachen_000000_000019_gtFine_labelIds.png", "Masks without an image"],
            cityscapes_samples, root)
    _save_rgb(root / "leftImg8bit" / "train" / "aachen" / "aachen_000005_000019_leftImg8bit.png")
    _raises(["aachen_000005_000019_leftImg8bit.png"], cityscapes_samples, root)
    _raises(["val", "train"], cityscapes_samples, root, "val")
    (root / "leftImg8bit" / "test").mkdir()
    (root / "gtFine" / "test").mkdir()
    _raises(["test", "no"], cityscapes_samples, root, "test")


def test_folder_bad_data(folders, tmp_path):
    images, masks = folders
    _save_mask(masks / "b.png", np.arange(H * W).reshape(H, W) % 5, palette=False)
    _raises(["b.png", "3, 4"], segmentation_folders, images, masks, num_classes=3)
    _save_rgb(images / "c.png")
    _raises(["c.png", "Images without a mask"], segmentation_folders, images, masks, 3)
    (images / "c.png").unlink()
    _save_mask(masks / "d.png", np.zeros((H, W)))
    _raises(["d.png", "Masks without an image"], segmentation_folders, images, masks, 3)
    (masks / "d.png").unlink()
    (masks / "b.png").write_bytes(b"\x89PNG broken")
    _raises(["b.png"], segmentation_folders, images, masks, 3)
    _save_rgb(masks / "b.png")
    _raises(["b.png", "RGB"], segmentation_folders, images, masks, 3)
    (masks / "b.png").unlink()
    _save_rgb(masks / "b.jpg")
    _raises(["b.jpg", "JPEG"], segmentation_folders, images, masks, 3)
    (tmp_path / "empty").mkdir()
    _raises(["empty"], segmentation_folders, tmp_path / "empty", masks, 3)
    _raises(["num_classes"], segmentation_folders, images, masks, 0)


def test_read_mask_grey_values(tmp_path):
    _save_mask(tmp_path / "m.png", np.full((H, W), 7), palette=False)
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == np.int64 and (mask == 7).all()


# --------------------------------------------------------------------------- dataset


def _coded_samples(n=3, h=H, w=W):
    """Images whose first channel encodes the mask (class / 10), to check alignment."""
    out = []
    for i in range(n):
        mask = np.random.default_rng(i).integers(0, 4, (h, w))
        image = np.stack([mask / 10, np.random.default_rng(i).random((h, w)), np.ones((h, w))],
                         axis=-1)
        out.append((f"s{i}", image.astype(np.float32), mask))
    return out


def _aligned(item):
    target, code = item["target"].numpy(), item["input"][0].numpy()
    keep = target != IGNORE_INDEX
    np.testing.assert_allclose(code[keep] * 10, target[keep], atol=1e-5)


def test_training_items_are_keyed_aligned_and_flipped():
    a, b = (SegmentationDataset(_coded_samples(), 4, crop=16, length=7, seed=3) for _ in range(2))
    assert len(a) == 7
    first = [a[i] for i in range(7)]
    for x, y in zip(first, [b[i] for i in range(7)]):
        assert torch.equal(x["input"], y["input"]) and torch.equal(x["target"], y["target"])
        assert x["input"].shape == (3, 16, 16) and x["target"].shape == (16, 16)
        _aligned(x)
    assert first[3]["name"] == "s0"
    again = [a[0] for _ in range(12)]
    assert any(not torch.equal(first[0]["input"], x["input"]) for x in again)
    sample = _coded_samples()[0][1]
    windows = [x["input"][1].numpy() for x in again]
    flipped = [any(np.array_equal(win, sample[t:t + 16, l:l + 16, 1][:, ::-1])
                   for t in range(H - 15) for l in range(W - 15)) for win in windows]
    assert any(flipped) and not all(flipped)
    a.set_epoch(1)
    b.set_epoch(2)
    assert not torch.equal(a[0]["input"], b[0]["input"])


def test_small_images_are_padded_with_reflection_and_ignore():
    samples = _coded_samples(1)
    item = SegmentationDataset(samples, 4, crop=40, seed=0)[0]
    target, image = item["target"].numpy(), item["input"].numpy()
    assert target.shape == (40, 40) and (target != IGNORE_INDEX).sum() == H * W
    _aligned(item)
    if (target[:, :W] == IGNORE_INDEX).all():  # flipped: the padding is on the left
        target, image = target[:, ::-1], image[:, :, ::-1]
    assert (target[H:] == IGNORE_INDEX).all() and (target[:, W:] == IGNORE_INDEX).all()
    np.testing.assert_allclose(image[1, H], samples[0][1][H - 2, :, 1].tolist() + list(
        samples[0][1][H - 2, W - 2:W - 10:-1, 1]), atol=1e-6)


def test_evaluation_items_are_whole_or_centre_crops():
    samples = _coded_samples(2)
    whole = SegmentationDataset(samples, 4, train=False)
    centre = SegmentationDataset(samples, 4, crop=16, train=False)
    np.testing.assert_array_equal(whole[1]["target"].numpy(), samples[1][2])
    np.testing.assert_array_equal(centre[1]["target"].numpy(), samples[1][2][4:20, 8:24])
    assert torch.equal(centre[0]["input"], centre[0]["input"])
    with pytest.raises(IndexError):
        whole[2]


def test_dataset_rejects_bad_samples():
    image = np.zeros((H, W, 3), np.float32)
    _raises(["'x'", "7"], SegmentationDataset, [("x", image, np.full((H, W), 7))], 4)
    _raises(["'y'", "24x30"], SegmentationDataset, [("y", image, np.zeros((H, W - 2), int))], 4)
    _raises(["'z'", "float"], SegmentationDataset, [("z", image, np.zeros((H, W)))], 4)
    _raises(["no images"], SegmentationDataset, [], 4)
    _raises(["crop"], SegmentationDataset, _coded_samples(1), 4, crop=0)


# --------------------------------------------------------------------------- brain


def test_brain_split_slabs_are_disjoint_with_a_gap():
    slabs = sorted(((r, split) for split, rs in BRAIN_SLABS.items() for r in rs),
                   key=lambda rs: rs[0].start)
    for (lower, a), (upper, b) in zip(slabs, slabs[1:]):
        assert upper.start - lower.stop >= 6 and a != b  # interleaved, never touching
    assert {split for _, split in slabs[:4]} == {"train", "val", "test"}  # spread along z
    assert [len(brain_slices(s)) for s in BRAIN_SLABS] == \
        [sum(len(r) for r in rs) for rs in BRAIN_SLABS.values()]
    names = {s: {name for name, _, _ in brain_slices(s)} for s in BRAIN_SLABS}
    assert not names["train"] & names["val"] and not names["val"] & names["test"]


def test_brain_labels_are_plausible():
    train = brain_slices("train")
    images = np.stack([img for _, img, _ in train])
    labels = np.stack([lab for _, _, lab in train])
    assert images.shape == (60, 96, 80, 1) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    assert labels.dtype == np.int64 and set(np.unique(labels)) == {0, 1, 2}
    fractions = np.bincount(labels.ravel(), minlength=3) / labels.size
    assert 0.3 < fractions[0] < 0.8 and 0.15 < fractions[1] < 0.45 and 0.05 < fractions[2] < 0.35
    assert min((lab > 0).mean() for lab in labels) > 0.03  # no empty slices
    t1 = [images[..., 0][labels == k].mean() for k in range(3)]
    assert t1[2] > t1[1] > t1[0]  # T1 contrast: white > grey > background/CSF
    for split in ("val", "test"):
        assert set(np.unique(np.stack([lab for _, _, lab in brain_slices(split)]))) == {0, 1, 2}


def test_brain_datasets_and_options():
    task = make_task({"name": "segment", "data": "brain", "downsample": 4})
    train = task.dataset("train", 32, random=True)
    assert train.num_classes == len(BRAIN_CLASSES) == len(task.classes) and train.train
    assert train[0]["input"].shape == (1, 32, 32)
    assert task.dataset("val")[0]["input"].shape == (1, 48, 40)
    _raises(["downsample=3"], brain_slices, "train", 3)
    _raises(["'dev'"], brain_slices, "dev")


def test_brain_missing_packages_are_reported(monkeypatch):
    import importlib.util
    import sys
    find_spec = importlib.util.find_spec
    brain_module._volume.cache_clear()
    brain_module._labelled.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "nibabel", None)
        _raises(["pip install nilearn nibabel"], brain_slices, "val")
        monkeypatch.undo()
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "nilearn" else find_spec(name, *a))
        _raises(["pip install nilearn nibabel"], brain_slices, "val")
    finally:
        monkeypatch.undo()
        brain_module._volume.cache_clear()
        brain_module._labelled.cache_clear()


# --------------------------------------------------------------------------- shapes


def _shape_kind(points: np.ndarray) -> int:
    """Class of a filled shape from affine-invariant moments: area / sqrt(det cov) is 4 pi for
    ellipses, 12 for rectangles and 6 sqrt(3) for triangles; the largest Mahalanobis distance
    from the centroid is 2 for ellipses, sqrt(6) for rectangles."""
    centred = points - points.mean(axis=0)
    cov = centred.T @ centred / len(points)
    small, large = np.linalg.eigvalsh(cov)
    reach = np.sqrt(np.einsum("ni,ij,nj->n", centred, np.linalg.inv(cov), centred)).max()
    if len(points) / np.sqrt(small * large) < 11.3:
        return SHAPE_CLASSES.index("triangle")
    if reach > 2.15:
        return SHAPE_CLASSES.index("rectangle")
    return SHAPE_CLASSES.index("circle" if np.sqrt(small / large) > 0.85 else "ellipse")


def test_shapes_are_deterministic_and_sized():
    val = shape_samples("val")
    again = shape_samples("val")
    assert len(val) == SHAPES_SPLIT_SIZES["val"]
    for (n1, i1, m1), (n2, i2, m2) in zip(val, again):
        assert n1 == n2 and np.array_equal(i1, i2) and np.array_equal(m1, m2)
    assert not np.array_equal(val[0][1], shape_samples("val", seed=1)[0][1])
    assert not np.array_equal(val[0][1], shape_samples("test")[0][1])
    image, mask = val[0][1], val[0][2]
    assert image.shape == (96, 96, 3) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1 and mask.dtype == np.int64
    task = make_task({"name": "segment", "data": "shapes"})
    assert len(task.eval_sets()["test"]) == SHAPES_SPLIT_SIZES["test"]
    assert task.dataset("train", 64, random=True)[0]["input"].shape == (3, 64, 64)


def test_shape_labels_match_shape_kinds():
    counts = np.zeros(len(SHAPE_CLASSES), int)
    for _, _, mask in shape_samples("val"):
        counts += np.bincount(mask.ravel(), minlength=len(SHAPE_CLASSES))
        for kind in range(1, len(SHAPE_CLASSES)):
            parts, n = ndimage.label(mask == kind, structure=np.ones((3, 3)))
            for part in range(1, n + 1):
                assert _shape_kind(np.argwhere(parts == part).astype(float)) == kind
    assert (counts > 0).all()


def test_shapes_use_only_their_split_photos(monkeypatch):
    calls = []

    def fake_photos(split, color=True, max_side=None):
        calls.append(split)
        return [("flat", np.full((128, 128, 3), 0.25, np.float32))]

    monkeypatch.setattr(shapes_module, "bundled_images", fake_photos)
    shapes_module._photos.cache_clear()
    try:
        _, image, mask = shape_samples("test")[0]
    finally:
        shapes_module._photos.cache_clear()
    assert calls == ["test"]
    assert (image[mask == 0] == 0.25).all()
