"""The image-level split of the bundled photos and the evaluation tiles (issue 33, item 3)."""
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest

from ernas.data.images import (BUNDLED, SPLITS, bundled_images, bundled_info, bundled_names,
                               bundled_scene, load_bundled)
from ernas.data.tiles import image_of, image_tiles, tile_offsets, tiled
from ernas.errors import ErnasError
from ernas.task import make_task

VAL_SCENES, TEST_SCENES = 5, 7  # the counts docs/data.md states


def _scenes(split):
    return {bundled_scene(n) for n in bundled_names(split)}


def test_every_image_is_in_exactly_one_split():
    names = [i.name for i in BUNDLED]
    assert not [n for n, c in Counter(names).items() if c > 1]
    listed = [n for s in SPLITS for n in bundled_names(s)]
    assert sorted(listed) == sorted(names)


def test_scenes_never_cross_splits_and_the_motorcycle_pair_stays_together():
    splits_of = defaultdict(set)
    for image in BUNDLED:
        splits_of[image.scene_name].add(image.split)
    assert all(len(s) == 1 for s in splits_of.values()), splits_of
    assert bundled_scene("motorcycle_left") == bundled_scene("motorcycle_right") == "motorcycle"
    assert bundled_info("motorcycle_left").split == bundled_info("motorcycle_right").split


def test_train_is_largest_and_val_test_hold_the_stated_scene_counts():
    train, val, test = (len(_scenes(s)) for s in SPLITS)
    assert train > val and train > test
    assert val >= VAL_SCENES and test >= TEST_SCENES


def test_every_bundled_image_loads_as_a_distinct_photo():
    """Each catalogue entry loads with its native channels, is a real image (many grey
    levels), and no two entries hold the same picture (pywt's camera is skimage's)."""
    from skimage.transform import resize

    thumbs = {}
    for image in BUNDLED:
        img = load_bundled(image.name, max_side=96)
        assert img.shape[2] == (3 if image.kind == "color" else 1), image
        assert 0 <= img.min() and img.max() <= 1 and len(np.unique(img)) > 64, image
        thumbs[image.name] = resize(img.mean(2), (32, 32), anti_aliasing=True).ravel()
    names = list(thumbs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.corrcoef(thumbs[a], thumbs[b])[0, 1] < 0.98, (a, b)


# --------------------------------------------------------------------------- tiles

def test_tile_names_give_back_the_image_and_the_pixels():
    img = np.arange(100 * 130 * 2, dtype=np.float32).reshape(100, 130, 2)
    tiles = image_tiles("photo_1", img, 32)
    assert len(tiles) == 3 * 4  # 100 // 32 rows, 130 // 32 columns
    assert tile_offsets(100, 32, 32) == [2, 34, 66] and tile_offsets(130, 32, 32) == [1, 33, 65, 97]
    for name, tile in tiles:
        assert image_of(name) == "photo_1"
        y, x = map(int, name.split("@")[1].split("_"))
        np.testing.assert_array_equal(tile, img[y:y + 32, x:x + 32])
    overlapping = image_tiles("photo_1", img, 32, stride=16)
    assert len(overlapping) == 5 * 7 and overlapping[1][0] == "photo_1@2_17"


def test_image_of_keeps_names_without_a_tile_suffix():
    assert image_of("coffee") == "coffee"
    assert image_of("holiday@home") == "holiday@home"  # a user's file name with '@'
    assert image_of("holiday@home@64_0") == "holiday@home"


def test_an_image_smaller_than_a_tile_is_refused():
    with pytest.raises(ErnasError, match=r"tiny.*20x40.*32"):
        tiled([("ok", np.zeros((64, 64, 3))), ("tiny", np.zeros((20, 40, 3)))], 32)
    with pytest.raises(ErnasError, match="stride"):
        image_tiles("ok", np.zeros((64, 64, 3)), 32, stride=0)


def test_tiles_of_the_splits_never_cross_splits():
    images_of = {}
    for split in SPLITS:
        tiles = tiled(bundled_images(split, max_side=128), 32)
        images_of[split] = {image_of(name) for name, _ in tiles}
        assert images_of[split] == set(bundled_names(split))
    assert not images_of["train"] & images_of["val"]
    assert not images_of["train"] & images_of["test"]
    assert not images_of["val"] & images_of["test"]


def test_denoise_eval_sets_in_tiles():
    task = make_task({"name": "denoise", "eval_tile": 128, "eval_sigmas": [25]})
    items = task.eval_sets()["sigma25"]
    names = [name for name, _ in items.images]
    assert {image_of(n) for n in names} == set(bundled_names("test"))
    assert len(names) == len(set(names))
    first = items[0]
    assert first["target"].shape == (3, 128, 128) and first["name"] == names[0]
    with pytest.raises(ErnasError, match="eval_tile"):
        make_task({"name": "denoise", "eval_tile": 4})


def test_a_bad_eval_tile_is_refused_by_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ernas.cli.evaluate", "task.eval_tile=0",
                        f"hydra.run.dir={tmp_path / 'x'}"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr[-2000:]
    assert "eval_tile" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").glob("*.json"))


def test_docs_list_the_split_that_the_code_uses():
    """docs/data.md's split table names every catalogue image with its package, kind and
    split (a split changed in code but not in the docs fails here)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[4] in SPLITS:
            rows[cells[0]] = (cells[1], cells[3], cells[4], cells[5])
    expected = {i.name: (i.package, "colour" if i.kind == "color" else "grey", i.split,
                         i.scene_name) for i in BUNDLED}
    assert rows == expected
