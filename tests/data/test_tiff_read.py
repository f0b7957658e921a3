"""Patch TIFFs are read by libtiff (imagecodecs) where it can, and that gives the array tifffile
gives for every layout patches come in; a broken file is still one BadPatchError line."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from hlss.data import io as patch_io
from hlss.data.io import load_patch, read_patch
from hlss.errors import BadPatchError

RNG = np.random.default_rng(0)
SRH = RNG.integers(0, 65535, (2, 40, 36), dtype=np.uint16)
RGB = RNG.integers(0, 255, (40, 36, 3), dtype=np.uint8)

LAYOUTS = {
    "srh_pages": (SRH, {}),
    "srh_planar_separate": (SRH, {"planarconfig": "separate", "photometric": "minisblack"}),
    "srh_deflate": (SRH, {"compression": "zlib"}),
    "srh_lzw": (SRH, {"compression": "lzw"}),
    "srh_tiled": (SRH[:, :32, :32], {"tile": (16, 16)}),
    "srh_bigtiff": (SRH, {"bigtiff": True}),
    "he_rgb": (RGB, {"photometric": "rgb"}),
    "he_rgb_deflate": (RGB, {"photometric": "rgb", "compression": "zlib"}),
    "he_channel_first": (np.ascontiguousarray(RGB.transpose(2, 0, 1)), {}),
    "grey": (SRH[0], {}),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_libtiff_read_equals_tifffile(tmp_path, name):
    arr, options = LAYOUTS[name]
    path = str(tmp_path / f"{name}.tif")
    tifffile.imwrite(path, arr, **options)
    fast = patch_io._decode_tiff_libtiff(path)
    assert fast is not None, f"libtiff did not read {name}"
    expected = tifffile.imread(path)
    got = read_patch(path)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_a_file_libtiff_cannot_read_goes_to_tifffile(tmp_path, monkeypatch):
    path = str(tmp_path / "p.tif")
    tifffile.imwrite(path, SRH)
    monkeypatch.setattr(patch_io, "_decode_tiff_libtiff", lambda path: None)
    np.testing.assert_array_equal(read_patch(path), SRH)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_broken_tiff_is_one_bad_patch_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "p.tif"
    tifffile.imwrite(str(path), SRH)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"II*\x00" + b"\x07" * 64)
    with pytest.raises(BadPatchError, match=r"p\.tif"):
        load_patch(str(path), "srh")


def test_without_imagecodecs_tifffile_reads_every_patch(tmp_path, monkeypatch):
    path = str(tmp_path / "p.tif")
    tifffile.imwrite(path, SRH)
    monkeypatch.setattr(patch_io, "_tiff_decode", lambda: None)
    assert patch_io._decode_tiff_libtiff(path) is None
    np.testing.assert_array_equal(read_patch(path), SRH)
