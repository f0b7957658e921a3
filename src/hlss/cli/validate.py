"""``hlss-validate``: check a dataset against its metadata and print a report.

Usage::

    hlss-validate root=/data/opensrh [workers=4] [expected_size=300] [clean_out=/tmp/clean]

Exit status: 0 when the dataset is trainable (warnings allowed), 1 when it is not, 2 for usage
errors (unknown key, bad value, missing root, refusing to overwrite a cleaned copy).
"""

from __future__ import annotations

import sys
import time

from hlss.cli.common import parse_key_values, user_errors_exit
from hlss.errors import HLSSError

PROG = "hlss-validate"
DEFAULTS = {
    "root": ...,
    "dataset": "opensrh",
    "check_images": True,
    "expected_size": 0,
    "workers": 4,
    "clean_out": "",
    "include_nondiagnostic": False,
    "max_examples": 5,
    "meta_file": "",
    "split_file": "",
}
SUPPORTED = ("opensrh",)


def _progress_printer(every_s: float = 10.0):
    """A ``progress(done, total)`` callback that prints to stderr at most every ``every_s`` s."""
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            print(f"{PROG}: checked {done}/{total} files", file=sys.stderr, flush=True)

    return progress


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    """Validate the dataset named by ``key=value`` arguments, print the report, return the status.

    Args:
        argv: arguments (default ``sys.argv[1:]``); see ``DEFAULTS`` for the keys.

    Returns:
        0 when the dataset is trainable, 1 when it is not.

    Raises:
        SystemExit(2): a usage error or any other :class:`HLSSError` (one line on stderr).
    """
    from hlss.data.validate import check_clean_out, metadata_paths, validate_opensrh

    args = parse_key_values(sys.argv[1:] if argv is None else list(argv), DEFAULTS, PROG)
    if args["dataset"] not in SUPPORTED:
        raise HLSSError(
            f"dataset={args['dataset']}: not supported by {PROG} yet "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    for key in ("workers", "expected_size", "max_examples"):
        if args[key] < 0:
            raise HLSSError(f"{key}: must be >= 0, got {args[key]}")
    meta_file, split_file = args["meta_file"] or None, args["split_file"] or None
    root, meta_path, split_path = metadata_paths(args["root"], meta_file, split_file)
    if args["clean_out"]:
        # refuse an unusable output folder before a long scan, not after it
        check_clean_out(args["clean_out"], root, meta_path, split_path)

    report = validate_opensrh(
        root,
        check_images=args["check_images"],
        expected_size=args["expected_size"] or None,
        workers=args["workers"],
        include_nondiagnostic=args["include_nondiagnostic"],
        meta_file=meta_file,
        split_file=split_file,
        progress=_progress_printer(),
    )
    print(report.to_text(max_examples=args["max_examples"]))
    if args["clean_out"]:
        if report.clean_meta is None:
            print(f"{PROG}: metadata unreadable; no cleaned copy written", file=sys.stderr)
        else:
            meta_out, split_out = report.write_clean_meta(args["clean_out"])
            print(f"cleaned metadata written: {meta_out}")
            print(f"                          {split_out}")
            print(
                f"use it with: hlss-train dataset=opensrh dataset.root={root} "
                f"dataset.table.meta_file={meta_out} dataset.table.split_file={split_out}"
            )
    return 0 if report.trainable else 1


if __name__ == "__main__":
    raise SystemExit(main())
