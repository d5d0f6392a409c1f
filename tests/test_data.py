import numpy as np
import pytest
import skimage.io
import torch

from ernas.data import BUNDLED_SPLITS, bundled_images, bundled_names, load_bundled, read_image
from ernas.tasks.denoise.data import (
    NoisyImageDataset,
    PairedImageDataset,
    SigmaSpec,
    add_gaussian_noise,
    clean_folder,
    paired_folders,
    test_noise,
)
from ernas.errors import ErnasError
from ernas.task import make_task


def _photo(h=48, w=64, c=3, seed=0):
    """A smooth, non-symmetric image (so crops/rotations are distinguishable)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [(np.sin(xx / (5 + k)) * np.cos(yy / (7 + k)) + 1) / 2 for k in range(c)]
    rng = np.random.default_rng(seed)
    return np.clip(np.stack(chans, -1) * 0.8 + 0.1 * rng.random((h, w, c)), 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- bundled images

def test_split_constant_matches_api():
    """BUNDLED_SPLITS (by native kind) and bundled_names (every image of a split) agree."""
    assert BUNDLED_SPLITS["color"]["val"] == ("chelsea", "grace_hopper")
    for split in ("train", "val", "test"):
        by_kind = BUNDLED_SPLITS["color"][split] + BUNDLED_SPLITS["grey"][split]
        assert sorted(bundled_names(split)) == sorted(by_kind)
        assert bundled_names(split, color=False) == bundled_names(split)


@pytest.mark.parametrize("name,channels", [("chelsea", 3), ("china", 3), ("grace_hopper", 3),
                                           ("coins", 1), ("page", 1)])
def test_bundled_shape_dtype_range(name, channels):
    img = load_bundled(name)
    assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == channels
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.5
    img[:] = 0  # a copy: the cache is not affected
    assert load_bundled(name).max() > 0.5


def test_bundled_max_side_downscales():
    img = load_bundled("retina", max_side=200)
    assert max(img.shape[:2]) <= 200 and img.shape[2] == 3
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert load_bundled("coins", max_side=1000).shape == (303, 384, 1)


def test_bundled_images_convert_every_image_to_the_task_channels():
    """The colour task gets grey photos as three equal channels, the grey task gets luma."""
    colour = dict(bundled_images("val", color=True, max_side=64))
    grey = dict(bundled_images("val", color=False, max_side=64))
    assert set(colour) == set(grey) == {"chelsea", "grace_hopper", "page", "text", "coins"}
    assert all(img.shape[2] == 3 for img in colour.values())
    assert all(img.shape[2] == 1 for img in grey.values())
    np.testing.assert_array_equal(colour["coins"][..., 0], colour["coins"][..., 2])
    np.testing.assert_array_equal(colour["coins"][..., :1], grey["coins"])
    assert np.abs(colour["chelsea"][..., 0] - colour["chelsea"][..., 2]).max() > 0.1


def test_bundled_errors_list_valid_choices():
    with pytest.raises(ErnasError, match="train"):
        bundled_names("training")
    with pytest.raises(ErnasError, match="astronaut"):
        load_bundled("lena")


def test_read_image_color_conversion_and_16bit(tmp_path):
    grey8 = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    skimage.io.imsave(tmp_path / "g.png", grey8, check_contrast=False)
    as_rgb = read_image(tmp_path / "g.png", color=True)
    assert as_rgb.shape == (32, 32, 3) and as_rgb.dtype == np.float32
    np.testing.assert_allclose(as_rgb[..., 1], grey8 / 255.0, atol=1e-6)

    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    skimage.io.imsave(tmp_path / "a.png", rgba, check_contrast=False)
    assert read_image(tmp_path / "a.png", color=True).shape == (16, 16, 3)
    assert read_image(tmp_path / "a.png", color=False).shape == (16, 16, 1)

    g16 = np.full((8, 8), 65535 // 2, np.uint16)
    skimage.io.imsave(tmp_path / "d.png", g16, check_contrast=False)
    np.testing.assert_allclose(read_image(tmp_path / "d.png", color=False), 0.5, atol=1e-4)


# --------------------------------------------------------------------------- noise

def test_noise_std_and_not_clipped():
    clean = np.full((256, 256, 3), 0.5, np.float32)
    clean[:, :128] = 0.0  # half black: noise must go below 0
    noisy = add_gaussian_noise(clean, 25, generator=0)
    diff = noisy - clean
    assert abs(diff.std() - 25 / 255) < 0.003
    assert abs(diff.mean()) < 0.002
    assert noisy.min() < 0.0
    t = torch.from_numpy(clean.transpose(2, 0, 1).copy())
    noisy_t = add_gaussian_noise(t, 50, torch.Generator().manual_seed(1))
    assert isinstance(noisy_t, torch.Tensor) and abs((noisy_t - t).std().item() - 50 / 255) < 0.005


def test_test_noise_deterministic_per_seed_and_index():
    clean = torch.zeros(3, 32, 32)
    a, b = test_noise(clean, 25, 0, 3), test_noise(clean, 25, 0, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, test_noise(clean, 25, 0, 4))
    assert not torch.equal(a, test_noise(clean, 25, 1, 3))
    # same underlying z for every sigma
    torch.testing.assert_close(test_noise(clean, 50, 0, 3), 2 * a)


def test_sigma_spec_parsing():
    assert SigmaSpec.parse(25) == SigmaSpec("fixed", (25.0,))
    assert SigmaSpec.parse([5, 50]) == SigmaSpec("range", (5.0, 50.0))
    assert SigmaSpec.parse({"choice": [15, 25, 50]}) == SigmaSpec("choice", (15.0, 25.0, 50.0))
    rng = np.random.default_rng(0)
    draws = {SigmaSpec.parse({"choice": [15, 25, 50]}).sample(rng) for _ in range(100)}
    assert draws == {15.0, 25.0, 50.0}
    r = [SigmaSpec.parse([5, 50]).sample(rng) for _ in range(100)]
    assert 5 <= min(r) and max(r) <= 50 and len(set(r)) > 50


@pytest.mark.parametrize("bad", ["25", [1, 2, 3], [50, 5], {"choices": [15]}, {"choice": []},
                                 -1, float("nan"), True, None])
def test_sigma_spec_errors(bad):
    with pytest.raises(ErnasError, match="sigma"):
        SigmaSpec.parse(bad)


# --------------------------------------------------------------------------- synthetic dataset

def _pool():
    return [("a", _photo(48, 64, seed=1)), ("b", _photo(40, 40, seed=2))]


def test_train_samples_shape_and_determinism_by_seed():
    ds1 = NoisyImageDataset(_pool(), crop=32, sigma=[10, 50], train=True, length=10, seed=7)
    ds2 = NoisyImageDataset(_pool(), crop=32, sigma=[10, 50], train=True, length=10, seed=7)
    ds3 = NoisyImageDataset(_pool(), crop=32, sigma=[10, 50], train=True, length=10, seed=8)
    assert len(ds1) == 10
    s1, s2, s3 = ds1[3], ds2[3], ds3[3]
    assert s1["target"].shape == (3, 32, 32) and s1["target"].dtype == torch.float32
    assert s1["name"] == "b" and 10 <= s1["sigma"] <= 50
    assert torch.equal(s1["target"], s2["target"]) and torch.equal(s1["input"], s2["input"])
    assert not torch.equal(s1["input"], s3["input"])
    # a second read of the same index is a fresh sample
    assert not torch.equal(ds1[3]["input"], s1["input"])


def test_train_augmentation_is_a_dihedral_crop_of_the_image():
    img = _photo(40, 40, seed=3)
    ds = NoisyImageDataset([("x", img)], crop=None, sigma=0, train=True, length=40, seed=0)
    variants = {np.rot90(img, k)[:, ::f].tobytes() for k in range(4) for f in (1, -1)}
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        out = s["target"].numpy().transpose(1, 2, 0)
        assert out.tobytes() in variants
        assert torch.equal(s["input"], s["target"])  # sigma 0
        seen.add(out.tobytes())
    assert len(seen) >= 6


def test_eval_noise_reproducible_across_instances():
    imgs = _pool()
    ds1 = NoisyImageDataset(imgs, sigma=25, train=False, seed=0)
    ds2 = NoisyImageDataset(imgs, sigma=25, train=False, seed=0)
    ds3 = NoisyImageDataset(imgs, sigma=25, train=False, seed=1)
    assert len(ds1) == 2
    a, b, c = ds1[1], ds2[1], ds3[1]
    assert a["target"].shape == (3, 40, 40)
    np.testing.assert_array_equal(a["target"].numpy().transpose(1, 2, 0), imgs[1][1])
    assert torch.equal(a["input"], b["input"]) and torch.equal(ds1[1]["input"], a["input"])
    assert not torch.equal(a["input"], c["input"])
    assert a["sigma"] == 25.0


def test_eval_center_crop():
    img = _photo(48, 64)
    s = NoisyImageDataset([("a", img)], crop=32, sigma=15, train=False)[0]
    np.testing.assert_array_equal(s["target"].numpy().transpose(1, 2, 0), img[8:40, 16:48])


def test_crop_larger_than_image_names_image():
    with pytest.raises(ErnasError, match=r"b.*40x40.*45"):
        NoisyImageDataset(_pool(), crop=45, sigma=25)


def test_dataloader_batches():
    ds = NoisyImageDataset(_pool(), crop=16, sigma={"choice": [15, 25]}, length=6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["input"].shape == (3, 3, 16, 16) and batch["sigma"].shape == (3,)


def test_denoise_task_splits_and_eval_sets():
    task = make_task({"name": "denoise", "max_side": 128})
    train = task.dataset("train", 32, seed=0, random=True)
    assert train.train and train[0]["target"].shape == (3, 32, 32)
    assert not task.dataset("val", 32).train
    sets = task.eval_sets()
    assert list(sets) == ["sigma15", "sigma25", "sigma50"] and task.headline_set == "sigma25"
    assert [it["name"] for it in sets["sigma25"]] == bundled_names("test")
    # test images are whole (max_side applies to training photos only), grey ones as RGB
    assert sets["sigma25"][0]["target"].shape == (3, 500, 741)
    ascent = bundled_names("test").index("ascent")
    assert sets["sigma25"][ascent]["target"].shape == (3, 512, 512)
    grey = make_task({"name": "denoise", "color": False, "max_side": 128})
    assert grey.dataset("val", 32)[0]["target"].shape[0] == 1


# --------------------------------------------------------------------------- folders

def _save(path, img):
    skimage.io.imsave(path, (np.clip(img, 0, 1) * 255).round().astype(np.uint8),
                      check_contrast=False)


def test_clean_folder_reads_sorted(tmp_path):
    _save(tmp_path / "b.png", _photo(20, 24))
    _save(tmp_path / "a.jpg", _photo(30, 24))
    (tmp_path / "notes.txt").write_text("not an image")
    items = clean_folder(tmp_path, color=True)
    assert [n for n, _ in items] == ["a", "b"]
    assert items[1][1].shape == (20, 24, 3)
    assert clean_folder(tmp_path, color=False)[0][1].shape == (30, 24, 1)


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ErnasError, match="nope"):
        clean_folder(missing, color=True)


def test_empty_folder_lists_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ErnasError) as err:
        clean_folder(tmp_path, color=True)
    assert str(tmp_path) in str(err.value) and ".png" in str(err.value)


def test_unreadable_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"this is not a png at all")
    with pytest.raises(ErnasError, match="x.png"):
        clean_folder(tmp_path, color=True)


def test_too_small_for_crop(tmp_path):
    _save(tmp_path / "small.png", _photo(20, 24))
    with pytest.raises(ErnasError, match=r"small\.png.*20x24.*32"):
        clean_folder(tmp_path, color=True, min_size=32)
    with pytest.raises(ErnasError, match=r"small.*20x24.*32"):
        NoisyImageDataset(clean_folder(tmp_path, color=True), crop=32)


def test_unmatched_pairs(tmp_path):
    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    noisy.mkdir(), clean.mkdir()
    for n in ("a", "b", "only_noisy"):
        _save(noisy / f"{n}.png", _photo(16, 16))
    for n in ("a", "b", "only_clean"):
        _save(clean / f"{n}.png", _photo(16, 16))
    with pytest.raises(ErnasError) as err:
        paired_folders(noisy, clean, color=True)
    msg = str(err.value)
    assert "only_noisy" in msg and "only_clean" in msg and str(noisy) in msg


def test_pair_shape_mismatch(tmp_path):
    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    noisy.mkdir(), clean.mkdir()
    _save(noisy / "a.png", _photo(16, 16))
    _save(clean / "a.png", _photo(16, 20))
    with pytest.raises(ErnasError, match="a.png"):
        paired_folders(noisy, clean, color=True)
    with pytest.raises(ErnasError, match="differ in shape"):
        PairedImageDataset([("a", _photo(16, 16), _photo(16, 20))])


def test_paired_dataset_aligns_crops(tmp_path):
    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    noisy.mkdir(), clean.mkdir()
    for i in range(2):
        c = _photo(40, 48, seed=i) * 0.5
        _save(clean / f"im{i}.png", c)
        _save(noisy / f"im{i}.png", c + 0.2)  # noisy = clean + constant
    pairs = paired_folders(noisy, clean, color=True)
    assert [p[0] for p in pairs] == ["im0", "im1"]
    ds = PairedImageDataset(pairs, crop=24, train=True, length=16, seed=0)
    for i in range(len(ds)):
        s = ds[i]
        assert s["input"].shape == s["target"].shape == (3, 24, 24)
        torch.testing.assert_close(s["input"] - s["target"], torch.full((3, 24, 24), 0.2),
                                   atol=1.5 / 255, rtol=0)
    ev = PairedImageDataset(pairs, crop=None, train=False)[1]
    assert ev["target"].shape == (3, 40, 48) and ev["name"] == "im1"
