"""Data: procedural faces and image folders, including bad input."""
import numpy as np
import pytest
from PIL import Image

from fastbegan.data import (FACTORS, DataError, load_dataset, load_folder, load_npy,
                            procedural_faces)


def test_procedural_is_deterministic_and_varied():
    a, fa = procedural_faces(8, 32, seed=1)
    b, _ = procedural_faces(8, 32, seed=1)
    c, _ = procedural_faces(8, 32, seed=2)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(fa) == set(FACTORS) and all(v.shape == (8,) for v in fa.values())
    assert a.std(axis=0).mean() > 10  # the faces differ from each other


@pytest.mark.parametrize("res", [8, 64])
def test_procedural_any_resolution(res):
    assert procedural_faces(2, res)[0].shape == (2, res, res, 3)


def write_images(folder, specs):
    folder.mkdir(parents=True, exist_ok=True)
    for name, mode, size in specs:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if mode == "corrupt":
            (folder / name).write_bytes(b"not an image at all")
            continue
        if mode == "I;16":
            arr = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 40).astype(np.uint16)
            Image.fromarray(arr).save(folder / name)  # uint16 -> mode I;16
            continue
        color = {"RGB": (200, 10, 10), "L": 128, "RGBA": (0, 0, 255, 128), "P": 3}[mode]
        Image.new(mode, size, color).save(folder / name)


def test_folder_mixed_and_cached(tmp_path):
    d = tmp_path / "imgs"
    write_images(d, [("a.png", "RGB", (40, 30)), ("b.jpg", "L", (32, 32)), ("sub/c.png", "RGBA", (20, 20)),
                     ("d.png", "I;16", (16, 16)), ("e.webp", "RGB", (64, 64)), ("bad.jpg", "corrupt", None),
                     ("notes.txt", "corrupt", None)])
    arr, rep = load_folder(d, 16, cache_dir=tmp_path / "cache")
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    assert rep.found == 6 and rep.loaded == 5 and len(rep.unreadable) == 1
    assert rep.converted == 3  # L, RGBA, I;16
    assert "1 unreadable skipped" in rep.summary()
    arr2, rep2 = load_folder(d, 16, cache_dir=tmp_path / "cache")
    assert rep2.from_cache and np.array_equal(arr, arr2)
    # the crop is centered: a 40x30 red image is red everywhere
    assert (arr[0, ..., 0] > 190).all()


def test_tiny_images_are_upscaled_and_counted(tmp_path):
    write_images(tmp_path / "t", [("a.png", "RGB", (4, 4))])
    arr, rep = load_folder(tmp_path / "t", 16, cache_dir=tmp_path / "c")
    assert arr.shape == (1, 16, 16, 3) and rep.upscaled == 1


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("empty", "holds no images"),
    ("only_corrupt", "could be read"),
])
def test_bad_folders(tmp_path, case, match):
    d = tmp_path / "d"
    if case == "empty":
        d.mkdir()
    if case == "only_corrupt":
        write_images(d, [("a.jpg", "corrupt", None), ("b.png", "corrupt", None)])
    with pytest.raises(DataError, match=match):
        load_folder(d, 16, cache_dir=tmp_path / "c")


def test_npy_cache_checks_resolution(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((2, 8, 8, 3), np.uint8))
    assert load_dataset(str(p), 8)[0].shape == (2, 8, 8, 3)
    with pytest.raises(DataError, match="--res 16"):
        load_npy(p, 16)
