"""Whole-slide tiling (``hlss.data.wsi``): level choice, tissue mask, one slide to an HDF5 file,
bad slides, resume; on small pyramidal TIFFs written by the tests."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from hlss.data.wsi.grid import Resolution, choose_level, target_resolution, tissue_fractions
from hlss.data.wsi.slide import open_slide
from hlss.data.wsi.tiler import TileSettings, slide_file, thumbnail_file, tile_slide
from hlss.data.wsi.tissue import tissue_mask

from .wsi_slides import TISSUE, slide_levels, truncate, write_generic, write_svs

PATCH = 64


@pytest.fixture(scope="module")
def levels():
    return slide_levels(seed=0)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, levels):
    folder = tmp_path_factory.mktemp("slides")
    return {
        "svs": write_svs(folder / "TCGA-AB-0001-01Z-00-DX1.svs", levels),
        "generic": write_generic(folder / "generic.tif", levels, mpp=0.25),
        "no_mpp": write_svs(folder / "nompp.svs", levels, mpp=None, power=None),
    }


def _tile(source, out, name="s", **kw):
    settings = TileSettings(patch_size=PATCH, **kw)
    return tile_slide(str(source), name, str(out), settings)


def _read(out, name="s"):
    with h5py.File(slide_file(str(out), name), "r") as handle:
        return np.asarray(handle["tiles"]), np.asarray(handle["coords"]), dict(handle.attrs)


# ------------------------------------------------------------------------------ level choice


def test_level_is_the_coarsest_at_least_as_fine_as_the_target():
    downs = (1.0, 2.0, 4.0, 16.0)
    for mpp, level, read in [
        (0.5, 1, 64),
        (1.0, 2, 64),
        (0.75, 1, 96),
        (0.1, 0, 26),
        (8.0, 3, 128),
    ]:
        choice = choose_level(downs, target_resolution(0.25, None, mpp, None), 64, 0.25)
        assert (choice.level, choice.read_size) == (level, read), mpp
        assert choice.resample == (read != 64)
    # 0.252 um/px (a real 40x scanner) halved is within tolerance of 0.5: read as is
    near = choose_level(downs, target_resolution(0.252, None, 0.5, None), 64, 0.252)
    assert (near.level, near.read_size, round(near.mpp, 3)) == (1, 64, 0.504)


def test_magnification_uses_the_objective_power_or_ten_microns():
    assert target_resolution(0.25, 40, 0.5, 20) == Resolution(2.0, 0.5)
    assert target_resolution(None, 40, 0.5, 10) == Resolution(4.0, None)
    assert target_resolution(0.25, None, 0.5, 10) == Resolution(4.0, 1.0)
    assert "slide_mpp" in target_resolution(None, None, 0.5, None)
    assert "slide_mpp" in target_resolution(None, None, 0.5, 20)


def test_tissue_fraction_counts_mask_pixels_under_each_patch():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :2] = True
    corners = np.array([[0, 0], [8, 0], [0, 8], [16, 0]])  # level 0, mask downsample 2
    np.testing.assert_allclose(tissue_fractions(mask, 2.0, corners, 8.0), [0.5, 0, 0, 0])


# -------------------------------------------------------------------------------- tissue mask


def test_mask_finds_the_tissue_and_drops_glass_and_pen(levels):
    image = slide_levels(seed=3, pen=(40, 40, 200, 100))[2]  # downsample 4, green ink
    mask, threshold = tissue_mask(image)
    x0, y0, x1, y1 = (v // 4 for v in TISSUE)
    inside = mask[y0:y1, x0:x1].mean()
    outside = mask.sum() - mask[y0:y1, x0:x1].sum()
    assert inside > 0.97 and outside == 0 and 0 < threshold < 1
    blank, _ = tissue_mask(slide_levels(seed=4, tissue=None)[2])
    assert not blank.any()


# ------------------------------------------------------------------------------- one slide


@pytest.mark.parametrize(("kind", "mpp", "level"), [("svs", 0.5, 1), ("generic", 1.0, 2)])
def test_patches_are_the_slide_pixels_at_the_chosen_level(
    tmp_path, slides, levels, kind, mpp, level
):
    with open_slide(slides[kind]) as slide:
        assert slide.mpp == pytest.approx(0.25) and slide.level_downsamples == (1.0, 2.0, 4.0)
    result = _tile(slides[kind], tmp_path, mpp=mpp, tissue_threshold=1.0)
    assert result.status == "done", result.message
    tiles, coords, attrs = _read(tmp_path)
    ds = 2**level
    assert attrs["level"] == level and attrs["downsample"] == ds and attrs["mpp"] == mpp
    assert tiles.shape == (result.tiles, PATCH, PATCH, 3) and tiles.dtype == np.uint8
    footprint = PATCH * ds
    assert (coords % footprint == 0).all()  # the grid, in level-0 pixels
    x0, y0, x1, y1 = TISSUE
    # every kept patch lies inside the tissue, and every grid cell inside it is kept
    assert (coords[:, 0] >= x0).all() and (coords[:, 0] + footprint <= x1).all()
    assert (coords[:, 1] >= y0).all() and (coords[:, 1] + footprint <= y1).all()
    starts = range(0, 1024, footprint)
    cols = sum(x0 <= c and c + footprint <= x1 for c in starts)
    rows = sum(y0 <= r and r + footprint <= y1 for r in starts)
    assert len(coords) == cols * rows > 0
    for tile, (x, y) in zip(tiles, coords, strict=True):  # exact pixels: lossless slide
        expected = levels[level][y // ds : y // ds + PATCH, x // ds : x // ds + PATCH]
        np.testing.assert_array_equal(tile, expected)
    assert os.path.getsize(thumbnail_file(str(tmp_path), "s")) > 0


def test_resampled_patches_and_half_tissue_threshold(tmp_path, slides):
    result = _tile(slides["svs"], tmp_path, mpp=0.75, tissue_threshold=0.5)
    tiles, coords, attrs = _read(tmp_path)
    assert attrs["level"] == 1 and attrs["read_size"] == 96 and tiles.shape[1:] == (64, 64, 3)
    assert attrs["mpp"] == pytest.approx(0.75)
    footprint, (x0, y0, x1, y1) = 192, TISSUE
    assert (coords % footprint == 0).all() and result.tiles == len(coords)
    # at least half of each patch is tissue: its centre lies inside the rectangle
    centres = coords + footprint / 2
    assert ((centres[:, 0] >= x0) & (centres[:, 0] <= x1)).all()
    assert ((centres[:, 1] >= y0) & (centres[:, 1] <= y1)).all()
    assert np.abs(tiles.reshape(-1, 3).mean(0) - (190, 90, 160)).max() < 25


def test_max_patches_is_a_seeded_subset(tmp_path, slides):
    a = _tile(slides["svs"], tmp_path / "a", mpp=0.5, max_patches_per_slide=5)
    b = _tile(slides["svs"], tmp_path / "b", mpp=0.5, max_patches_per_slide=5)
    c = _tile(slides["svs"], tmp_path / "c", mpp=0.5, max_patches_per_slide=5, seed=9)
    assert a.tiles == b.tiles == c.tiles == 5
    ca, cb, cc = (_read(tmp_path / k)[1] for k in "abc")
    np.testing.assert_array_equal(ca, cb)
    assert not np.array_equal(ca, cc)
    assert (np.diff(ca[:, 1] * 10_000 + ca[:, 0]) > 0).all()  # grid order kept


def test_slide_without_mpp_needs_an_override(tmp_path, slides):
    result = _tile(slides["no_mpp"], tmp_path, mpp=0.5)
    assert result.status == "failed" and "slide_mpp" in result.message
    assert slides["no_mpp"] in result.message and not os.path.exists(slide_file(str(tmp_path), "s"))
    fixed = _tile(slides["no_mpp"], tmp_path, mpp=0.5, slide_mpp=0.25)
    assert fixed.status == "done" and _read(tmp_path)[2]["level"] == 1


def test_bad_slides_fail_with_their_name_and_leave_nothing(tmp_path, levels):
    bad = tmp_path / "bad"
    bad.mkdir()
    truncated = truncate(write_svs(bad / "cut.svs", levels))
    blank = write_svs(bad / "blank.svs", slide_levels(seed=5, tissue=None))
    not_slide = bad / "notes.svs"
    not_slide.write_text("not a slide")
    out = tmp_path / "out"
    for path, words in [
        (truncated, "truncated"),
        (blank, "no tissue"),
        (str(not_slide), "not a readable slide"),
    ]:
        result = _tile(path, out, name="x")
        assert result.status == "failed" and words in result.message, result.message
        assert result.message.startswith(str(path))
        assert not os.path.exists(slide_file(str(out), "x"))
    assert not out.exists() or os.listdir(out) == []


def test_rerun_keeps_a_finished_slide_and_redoes_a_half_written_one(tmp_path, slides):
    first = _tile(slides["svs"], tmp_path, mpp=1.0)
    target = slide_file(str(tmp_path), "s")
    stat = os.stat(target)
    again = _tile(slides["svs"], tmp_path, mpp=1.0)
    assert (again.status, again.tiles) == ("kept", first.tiles)
    assert os.stat(target).st_mtime_ns == stat.st_mtime_ns
    other = _tile(slides["svs"], tmp_path, mpp=0.5)
    assert other.status == "failed" and "other settings" in other.message
    assert os.stat(target).st_mtime_ns == stat.st_mtime_ns
    # a killed run's temporary file (its process is gone) is removed, the slide tiled
    stale = tmp_path / ".t.h5.partial-999999999"
    stale.write_bytes(b"half")
    redo = _tile(slides["svs"], tmp_path, name="t", mpp=1.0)
    assert redo.status == "done" and not stale.exists()
    # a file that is not a finished slide is never overwritten
    foreign = tmp_path / "u.h5"
    foreign.write_bytes(b"mine")
    refused = _tile(slides["svs"], tmp_path, name="u", mpp=1.0)
    assert refused.status == "failed" and "not overwritten" in refused.message
    assert foreign.read_bytes() == b"mine"


def test_openslide_backend_gives_the_same_patches(tmp_path, slides):
    pytest.importorskip("openslide", exc_type=ImportError)  # optional extra
    for backend in ("tiffslide", "openslide"):
        result = _tile(slides["svs"], tmp_path / backend, mpp=0.75, backend=backend)
        assert result.status == "done", result.message
    ts, ts_coords, _ = _read(tmp_path / "tiffslide")
    os_, os_coords, attrs = _read(tmp_path / "openslide")
    assert attrs["backend"] == "openslide" and attrs["level"] == 1
    np.testing.assert_array_equal(ts_coords, os_coords)
    np.testing.assert_array_equal(ts, os_)


def test_opening_drops_specks_and_keeps_blocks():
    from hlss.data.wsi.tissue import open_2x2

    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 5] = True  # a speck
    mask[1:4, 1:3] = True  # a 3x2 block
    mask[5, :] = True  # a one-pixel line
    expected = np.zeros_like(mask)
    expected[1:4, 1:3] = True
    np.testing.assert_array_equal(open_2x2(mask), expected)
