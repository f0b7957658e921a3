"""``hlss-synth``: write a synthetic dataset in the OpenSRH layout.

Example::

    hlss-synth out=data/synthetic size=64 patients_per_class=3
"""

from __future__ import annotations

import json
import os
import sys
import time

from hlss.cli.common import parse_key_values, user_errors_exit
from hlss.data.synthetic import META_NAME, SPLIT_NAME, generate_opensrh

DEFAULTS = {
    "out": ...,
    "seed": 0,
    "patients_per_class": 4,
    "slides_per_patient": 2,
    "patches_per_slide": 8,
    "nondiagnostic_per_slide": 1,
    "size": 300,
    "val_fraction": 0.25,
}


def _summary(root: str, seconds: float) -> str:
    """One line: root, patients per split, slides, diagnostic and nondiagnostic patches, time."""
    with open(os.path.join(root, "meta", META_NAME), encoding="utf-8") as handle:
        meta = json.load(handle)
    with open(os.path.join(root, "meta", SPLIT_NAME), encoding="utf-8") as handle:
        split = json.load(handle)
    slides = [s for entry in meta.values() for s in entry["slides"].values()]
    diagnostic = sum(len(s["tumor_patches"]) + len(s["normal_patches"]) for s in slides)
    nondiagnostic = sum(len(s["nondiagnostic_patches"]) for s in slides)
    return (
        f"wrote {root}: {len(meta)} patients ({len(split['train'])} train / "
        f"{len(split['val'])} val), {len(slides)} slides, {diagnostic} patches "
        f"(+{nondiagnostic} nondiagnostic) in {seconds:.1f} s"
    )


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    """Parse ``key=value`` arguments, generate the dataset, print one summary line.

    Raises:
        SystemExit: status 2 with one error line for a bad key/value, a missing ``out`` or an
            existing non-empty ``out`` directory.
    """
    args = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, "hlss-synth")
    start = time.perf_counter()
    root = generate_opensrh(**args)
    print(_summary(root, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
