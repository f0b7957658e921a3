"""``hlss-synth``: write a synthetic dataset in the OpenSRH layout.

The keys, their defaults and comments are in ``conf/synth.yaml`` (``hlss-synth --help``)::

    hlss-synth out=data/synthetic size=64 patients_per_class=3

The files written are counted on stderr (a bar with rate and ETA on a terminal, a line every 10%
/ 30 s otherwise; see :mod:`hlss.progress`); the summary line goes to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from hlss.cli.common import run_config_command
from hlss.data.opensrh import META_FILE, SPLIT_FILE
from hlss.schemas.tools import SynthConfig

PROG = "hlss-synth"


def _summary(root: str, seconds: float) -> str:
    """One line: root, patients per split, slides, diagnostic and nondiagnostic patches, time."""
    with open(os.path.join(root, META_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    with open(os.path.join(root, SPLIT_FILE), encoding="utf-8") as handle:
        split = json.load(handle)
    slides = [s for entry in meta.values() for s in entry["slides"].values()]
    diagnostic = sum(len(s["tumor_patches"]) + len(s["normal_patches"]) for s in slides)
    nondiagnostic = sum(len(s["nondiagnostic_patches"]) for s in slides)
    return (
        f"wrote {root}: {len(meta)} patients ({len(split['train'])} train / "
        f"{len(split['val'])} val), {len(slides)} slides, {diagnostic} patches "
        f"(+{nondiagnostic} nondiagnostic) in {seconds:.1f} s"
    )


def synth(args: SynthConfig) -> None:
    """Generate the dataset of ``args`` and print one summary line.

    Raises:
        HLSSError: a parameter out of range or an existing non-empty ``out`` directory.
    """
    from hlss.data.synthetic import generate_opensrh

    start = time.perf_counter()
    root = generate_opensrh(**dataclasses.asdict(args))
    print(_summary(root, time.perf_counter() - start))


def main(argv: list[str] | None = None) -> int:
    """Run ``hlss-synth`` with ``argv`` (default: the process's arguments); returns 0.

    Raises:
        SystemExit: status 2 with one ``error:`` line for bad input; status 0 after ``--help``.
    """
    return run_config_command(PROG, "synth", SynthConfig, synth, argv)


if __name__ == "__main__":
    raise SystemExit(main())
