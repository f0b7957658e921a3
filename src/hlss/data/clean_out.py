"""Writing the cleaned copy of OpenSRH metadata that ``hlss-validate clean_out=DIR`` produces.

The copy is two files, ``DIR/opensrh.json`` and ``DIR/train_val_split.json`` (the names of the
originals). Nothing the user has is overwritten: not the dataset's own ``meta/`` folder, not an
existing file.
"""

from __future__ import annotations

import json
import os

from hlss.data.opensrh import META_DIR, META_NAME, SPLIT_NAME
from hlss.errors import HLSSError


def check_clean_out(out_dir: str, root: str, meta_path: str, split_path: str) -> tuple[str, str]:
    """Check that a cleaned copy may be written into ``out_dir``; returns the two target paths.

    Args:
        out_dir: the folder to write into (created later if missing).
        root / meta_path / split_path: the dataset root and the metadata files being cleaned.

    Returns:
        Absolute ``(metadata target, split target)`` inside ``out_dir``.

    Raises:
        HLSSError: ``out_dir`` is empty, is the dataset's ``meta`` folder or the folder of the
            metadata files being cleaned, exists but is not a folder, or a target file exists.
    """
    if not str(out_dir).strip():
        raise HLSSError("clean_out: an output folder is required")
    out = os.path.abspath(os.path.expanduser(str(out_dir)))
    protected = {
        os.path.realpath(os.path.join(root, META_DIR)),
        os.path.realpath(os.path.dirname(meta_path)),
        os.path.realpath(os.path.dirname(split_path)),
    }
    if os.path.realpath(out) in protected:
        raise HLSSError(
            f"{out}: is the dataset's own metadata folder; write the cleaned copy somewhere else"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise HLSSError(f"{out}: exists and is not a folder")
    targets = (os.path.join(out, META_NAME), os.path.join(out, SPLIT_NAME))
    for target in targets:
        if os.path.lexists(target):
            raise HLSSError(f"{target}: already exists; refusing to overwrite")
    return targets


def write_clean_meta(
    out_dir: str, root: str, meta_path: str, split_path: str, meta: dict, split: dict
) -> tuple[str, str]:
    """Write ``meta`` and ``split`` as the cleaned copy into ``out_dir`` (see :func:`check_clean_out`).

    Each file is created exclusively, so a file that appeared since the check is not replaced.

    Returns:
        The absolute paths of the written metadata and split files.

    Raises:
        HLSSError: ``out_dir`` is refused by :func:`check_clean_out`, a target appeared meanwhile,
            or writing fails.
    """
    meta_out, split_out = check_clean_out(out_dir, root, meta_path, split_path)
    os.makedirs(os.path.dirname(meta_out), exist_ok=True)
    try:
        for target, content in ((meta_out, meta), (split_out, split)):
            with open(target, "x", encoding="utf-8") as handle:
                json.dump(content, handle, indent=1)
    except FileExistsError as err:
        raise HLSSError(f"{err.filename}: already exists; refusing to overwrite") from None
    except OSError as err:
        raise HLSSError(f"{out_dir}: cannot write cleaned metadata ({err})") from None
    return meta_out, split_out
