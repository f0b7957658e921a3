"""``hlss-validate``: check an OpenSRH-layout dataset against its metadata and print a report.

The keys, their defaults and comments are in ``conf/validate.yaml`` (``hlss-validate --help``)::

    hlss-validate root=/data/opensrh [workers=4] [expected_size=300] [clean_out=/tmp/clean]

Exit status: 0 when the report is clean or has warnings only, 1 when it has an error (training
refuses the dataset as given, or would drop data from it; ``strict=true``: a warning too), 2 for
usage errors (unknown key, bad value, missing root, refusing to overwrite a cleaned copy).

Only the OpenSRH layout is checked so far; the former ``dataset=opensrh`` key is gone because
Hydra reads ``dataset=...`` as the choice of the ``dataset`` config group (as in ``hlss-train``),
which is where another layout would be chosen.
"""

from __future__ import annotations

import sys
import time

from hlss.cli.common import run_config_command
from hlss.errors import ConfigError
from hlss.schemas.tools import ValidateConfig

PROG = "hlss-validate"


def _progress_printer(every_s: float = 10.0):
    """A ``progress(done, total)`` callback that prints to stderr at most every ``every_s`` s."""
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            print(f"{PROG}: checked {done}/{total} files", file=sys.stderr, flush=True)

    return progress


def check_arguments(args: ValidateConfig) -> None:
    """Refuse what the schema's types let through.

    Raises:
        ConfigError: a negative count; one line naming the key.
    """
    for key in ("workers", "expected_size", "max_examples"):
        if getattr(args, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {getattr(args, key)}")


def validate(args: ValidateConfig) -> int:
    """Validate the dataset of ``args``, print the report (and write the cleaned copy when
    ``clean_out`` is set); return the exit status (:meth:`ValidationReport.exit_status`): 1 on
    an error (with ``strict``, on a warning too), else 0.

    Raises:
        HLSSError: a bad argument, a missing dataset root, an unusable ``clean_out`` (checked
            before the scan, so a long scan is not wasted).
    """
    from hlss.data.validate import check_clean_out, metadata_paths, validate_opensrh

    check_arguments(args)
    meta_file, split_file = args.meta_file or None, args.split_file or None
    root, meta_path, split_path = metadata_paths(args.root, meta_file, split_file)
    if args.clean_out:
        # refuse an unusable output folder before a long scan, not after it
        check_clean_out(args.clean_out, root, meta_path, split_path)

    report = validate_opensrh(
        root,
        check_images=args.check_images,
        expected_size=args.expected_size or None,
        workers=args.workers,
        include_nondiagnostic=args.include_nondiagnostic,
        meta_file=meta_file,
        split_file=split_file,
        progress=_progress_printer(),
    )
    print(report.to_text(max_examples=args.max_examples))
    if args.clean_out:
        if report.clean_meta is None:
            print(f"{PROG}: metadata unreadable; no cleaned copy written", file=sys.stderr)
        else:
            meta_out, split_out = report.write_clean_meta(args.clean_out)
            print(f"cleaned metadata written: {meta_out}")
            print(f"                          {split_out}")
            print(
                f"use it with: hlss-train dataset=opensrh dataset.root={root} "
                f"dataset.table.meta_file={meta_out} dataset.table.split_file={split_out}"
            )
    status = report.exit_status(strict=args.strict)
    if status and not report.errors and report.trainable:
        print(f"strict=true: the {len(report.warnings)} warning(s) fail the check")
    return status


def main(argv: list[str] | None = None) -> int:
    """Run ``hlss-validate`` with ``argv`` (default: the process's arguments).

    Returns:
        0 when the report is clean or has warnings only, 1 when it has an error
        (``strict=true``: a warning too).

    Raises:
        SystemExit: status 2 for a usage error or any other :class:`HLSSError` (one line on
            stderr); status 0 after ``--help``.
    """
    return run_config_command(PROG, "validate", ValidateConfig, validate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
