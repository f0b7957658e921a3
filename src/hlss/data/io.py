"""Reading files from disk, with one clear error per bad file: patches and JSON metadata.

Patch references are file paths; a tile stored inside a per-slide HDF5 file is referenced as
``/path/to/slide.h5::<index>`` (row ``index`` of the file's ``tiles`` dataset).

:func:`load_patch` reads a patch for training (raises on a bad one); :func:`inspect_patch`
judges an SRH TIFF patch without raising (missing, unreadable, truncated, wrong shape, channel
order or dtype), for the dataset validator.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from hlss.errors import BadPatchError, DataError

H5_SEP = "::"
TIFF_EXT = (".tif", ".tiff")
IMAGE_EXT = (".png", ".jpg", ".jpeg")
H5_EXT = (".h5", ".hdf5")

# expected (channels, dtype) of a raw patch per modality
MODALITY_FORMAT = {"srh": (2, np.dtype(np.uint16)), "he": (3, np.dtype(np.uint8))}


@functools.cache
def _tiff_decode() -> Callable[..., np.ndarray] | None:
    """``imagecodecs.tiff_decode``, imported once; None where imagecodecs is missing."""
    try:
        from imagecodecs import tiff_decode
    except ImportError:
        return None
    return tiff_decode


def _decode_tiff_libtiff(path: str) -> np.ndarray | None:
    """All pages of a TIFF decoded by libtiff (``imagecodecs.tiff_decode``, ~3x faster than
    tifffile on a 300-px patch: no Python parsing of the tags); None where it cannot."""
    decode = _tiff_decode()
    if decode is None:
        return None
    try:
        with open(path, "rb") as handle:
            return decode(handle.read(), index=None)
    except Exception:  # a file libtiff does not read: tifffile decides, and names the problem
        return None


def _read_tiff(path: str) -> np.ndarray:
    """The image tifffile reads (``tifffile.imread``): libtiff's decoding of all pages where it
    reads the file, which gives the same array for the layouts patches come in (pages, planar or
    interleaved samples, strips or tiles, any compression; ``tests/data/test_tiff_read.py``);
    tifffile otherwise, whose error names what is wrong with a bad file."""
    arr = _decode_tiff_libtiff(path)
    if arr is not None:
        return arr
    import tifffile

    try:
        return tifffile.imread(path)
    except Exception as err:  # tifffile raises many types for broken files
        raise BadPatchError(path, f"unreadable TIFF ({type(err).__name__}: {err})") from None


def _read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise BadPatchError(path, f"unreadable image ({err})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _read_h5(ref: str) -> np.ndarray:
    import h5py

    path, _, index = ref.rpartition(H5_SEP)
    try:
        with h5py.File(path, "r") as handle:
            if "tiles" not in handle:
                raise BadPatchError(path, "HDF5 file has no 'tiles' dataset")
            tiles = handle["tiles"]
            arr = np.asarray(tiles[int(index)])
    except BadPatchError:
        raise
    except (OSError, ValueError, IndexError, KeyError) as err:
        raise BadPatchError(ref, f"unreadable HDF5 tile ({err})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] not in (2, 3):
        arr = np.ascontiguousarray(arr[..., :3].transpose(2, 0, 1))
    return arr


def read_patch(path: str) -> np.ndarray:
    """Read one patch as a channel-first array ``[C, H, W]`` in its stored dtype.

    Raises:
        BadPatchError: the file is missing, unreadable, or of an unknown type.
    """
    path = str(path)
    if H5_SEP in path:
        return _read_h5(path)
    if not os.path.isfile(path):
        raise BadPatchError(path, "file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext in TIFF_EXT:
        return _read_tiff(path)
    if ext in IMAGE_EXT:
        return _read_image(path)
    raise BadPatchError(path, f"unsupported file type {ext!r} (expected .tif, .png, .jpg or .h5)")


def check_patch(arr: np.ndarray, modality: str, path: str) -> np.ndarray:
    """Check a raw patch against its modality's format; returns it channel-first.

    SRH patches must be channel-first ``(2, H, W)`` uint16 (channel 0 = CH2, channel 1 = CH3);
    a channel-last SRH array is an error (its channel order cannot be trusted). H&E patches are
    ``(3, H, W)`` uint8; a channel-last RGB(A) tile (the usual TIFF/PNG layout) is transposed.

    Raises:
        BadPatchError: wrong number of dimensions, channel-last layout, channels or dtype.
    """
    channels, dtype = MODALITY_FORMAT[modality]
    if arr.ndim != 3:
        raise BadPatchError(
            path, f"expected a {channels}-channel image [C,H,W], got shape {arr.shape}"
        )
    if modality == "he" and arr.shape[0] != channels and arr.shape[-1] in (3, 4):
        # RGB(A) images (PNG/JPEG/TIFF tiles) are stored channel-last by convention
        arr = np.ascontiguousarray(arr[..., :3].transpose(2, 0, 1))
    if arr.shape[0] != channels:
        if arr.shape[-1] == channels:
            raise BadPatchError(
                path,
                f"channel-last shape {arr.shape}; {modality} patches must be channel-first ({channels}, H, W)",
            )
        raise BadPatchError(path, f"expected {channels} channels first, got shape {arr.shape}")
    if arr.dtype != dtype:
        raise BadPatchError(path, f"expected dtype {dtype}, got {arr.dtype}")
    return arr


def load_patch(path: str, modality: str) -> np.ndarray:
    """:func:`read_patch` followed by :func:`check_patch`."""
    return check_patch(read_patch(path), modality, path)


def load_json(path: str) -> object:
    """Load a JSON file, turning every failure into one clear :class:`DataError` line.

    Raises:
        DataError: the file is missing, unreadable, or not valid JSON (line and column named).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None


# ---------------------------------------------------------------------- TIFF integrity
PATCH_PROBLEMS = (
    "missing_file",
    "unreadable_tiff",
    "truncated_tiff",
    "wrong_shape",
    "channel_last",
    "wrong_dtype",
)
"""The codes :func:`inspect_patch` gives a bad patch (also finding codes of ``hlss-validate``)."""


class PatchVerdict(NamedTuple):
    """What :func:`inspect_patch` found: ``code`` is one of :data:`PATCH_PROBLEMS` or "" for a
    good patch, ``message`` a one-line reason ("" when good), ``size`` the ``(H, W)`` of a good
    patch, else None. Compares equal to the plain tuple ``(code, message, size)``."""

    code: str
    message: str
    size: tuple[int, int] | None

    @property
    def ok(self) -> bool:
        return not self.code


# bytes per value of each TIFF field type
_TIFF_TYPE_SIZE = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}


def tiff_truncation(buf: bytes) -> str | None:
    """Walk the IFD chain of an in-memory TIFF; say where it runs past the end of the file.

    tifffile decodes a file whose tail (tag values, a later image directory) is cut off without
    complaint, so that kind of truncation needs this walk to be noticed.

    Returns:
        A one-line reason, or None when the chain is intact or the bytes are not a TIFF header
        at all (tifffile then gives the reason).
    """
    size = len(buf)
    if size < 8:
        return (
            f"only {size} bytes; shorter than a TIFF header" if buf[:2] in (b"II", b"MM") else None
        )
    order = {b"II": "<", b"MM": ">"}.get(buf[:2])
    if order is None:
        return None
    magic = struct.unpack(order + "H", buf[2:4])[0]
    if magic == 42:
        offset = struct.unpack(order + "I", buf[4:8])[0]
        count_fmt, count_size, entry_size, next_fmt, next_size = "H", 2, 12, "I", 4
    elif magic == 43:
        if size < 16:
            return f"only {size} bytes; shorter than a BigTIFF header"
        offset = struct.unpack(order + "Q", buf[8:16])[0]
        count_fmt, count_size, entry_size, next_fmt, next_size = "Q", 8, 20, "Q", 8
    else:
        return None
    seen: set[int] = set()
    index = 0
    inline = next_size  # values up to this many bytes sit inside the entry
    while offset and offset not in seen and index < 100_000:
        seen.add(offset)
        if offset + count_size > size:
            return f"image directory {index} at byte {offset} lies beyond the end of the file ({size} bytes)"
        count = struct.unpack(order + count_fmt, buf[offset : offset + count_size])[0]
        end = offset + count_size + count * entry_size + next_size
        if end > size:
            return f"image directory {index} ends at byte {end}, beyond the end of the file ({size} bytes)"
        for k in range(count):
            pos = offset + count_size + k * entry_size
            tag, kind = struct.unpack(order + "HH", buf[pos : pos + 4])
            n_values = struct.unpack(order + next_fmt, buf[pos + 4 : pos + 4 + next_size])[0]
            nbytes = _TIFF_TYPE_SIZE.get(kind, 0) * n_values
            if nbytes > inline:
                value_at = struct.unpack(
                    order + next_fmt, buf[pos + 4 + next_size : pos + 4 + 2 * next_size]
                )[0]
                if value_at + nbytes > size:
                    return (
                        f"tag {tag} of image directory {index} ends at byte {value_at + nbytes}, "
                        f"beyond the end of the file ({size} bytes)"
                    )
        offset = struct.unpack(order + next_fmt, buf[end - next_size : end])[0]
        index += 1
    return None


def _decode_tiff(buf: bytes) -> np.ndarray | PatchVerdict:
    """The image of an in-memory TIFF, or the verdict saying why it cannot be decoded."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(buf)) as tif:
            if not len(tif.pages):
                return PatchVerdict("truncated_tiff", "truncated TIFF: no image in the file", None)
            for page in tif.pages:
                offsets = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                for off, n in zip(offsets, counts, strict=False):
                    if off + n > len(buf):
                        return PatchVerdict(
                            "truncated_tiff",
                            f"truncated TIFF: image data ends at byte {off + n}, file has {len(buf)}",
                            None,
                        )
            return tif.asarray()
    except Exception as err:  # tifffile raises many types for broken files
        text = f"{type(err).__name__}: {err}"
        if "failed to read" in str(err):
            return PatchVerdict("truncated_tiff", f"truncated TIFF ({text})", None)
        return PatchVerdict("unreadable_tiff", f"unreadable TIFF ({text})", None)


def _judge_srh_array(arr: np.ndarray, path: str) -> PatchVerdict:
    """Verdict on a decoded SRH patch: :func:`check_patch`'s rule, as a finding code."""
    try:
        check_patch(arr, "srh", path)
    except BadPatchError as err:
        if arr.ndim == 3 and arr.shape[0] != 2 and arr.shape[-1] == 2:
            return PatchVerdict("channel_last", err.problem, None)
        if arr.ndim != 3 or arr.shape[0] != 2:
            return PatchVerdict("wrong_shape", err.problem, None)
        return PatchVerdict("wrong_dtype", err.problem, None)
    if arr.size == 0:
        return PatchVerdict("wrong_shape", f"empty image, shape {arr.shape}", None)
    return PatchVerdict("", "", (int(arr.shape[1]), int(arr.shape[2])))


def inspect_patch(path: str) -> PatchVerdict:
    """Open one SRH patch file and judge it; keeps nothing of the image and never raises.

    A good patch is a complete TIFF holding a channel-first ``(2, H, W)`` uint16 array with
    ``H, W > 0``. The file is read once into memory, its structure walked
    (:func:`tiff_truncation`), then decoded with tifffile.

    Returns:
        A :class:`PatchVerdict` ``(code, message, size)``.
    """
    if not os.path.isfile(path):
        what = "not a regular file" if os.path.exists(path) else "file not found"
        return PatchVerdict("missing_file", what, None)
    try:
        with open(path, "rb") as handle:
            buf = handle.read()
    except OSError as err:
        return PatchVerdict("unreadable_tiff", f"cannot read ({err.strerror or err})", None)
    short = tiff_truncation(buf)
    if short:
        return PatchVerdict("truncated_tiff", f"truncated TIFF: {short}", None)
    decoded = _decode_tiff(buf)
    del buf
    if isinstance(decoded, PatchVerdict):
        return decoded
    return _judge_srh_array(decoded, path)
