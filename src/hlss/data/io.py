"""Reading single patches from disk, with one clear error per bad file.

Patch references are file paths; a tile stored inside a per-slide HDF5 file is referenced as
``/path/to/slide.h5::<index>`` (row ``index`` of the file's ``tiles`` dataset).
"""

from __future__ import annotations

import os

import numpy as np

from hlss.errors import BadPatchError

H5_SEP = "::"
TIFF_EXT = (".tif", ".tiff")
IMAGE_EXT = (".png", ".jpg", ".jpeg")
H5_EXT = (".h5", ".hdf5")

# expected (channels, dtype) of a raw patch per modality
MODALITY_FORMAT = {"srh": (2, np.dtype(np.uint16)), "he": (3, np.dtype(np.uint8))}


def _read_tiff(path: str) -> np.ndarray:
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
