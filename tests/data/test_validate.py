"""hlss-validate: findings, trainability verdict, cleaned metadata and the console script."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

from hlss import CLASSES_OPENSRH
from hlss.cli.validate import main as cli_main
from hlss.data.opensrh import read_opensrh
from hlss.data.report import Finding
from hlss.data.validate import validate_opensrh
from hlss.errors import HLSSError

from .opensrh_fixture import write_opensrh


@pytest.fixture
def fx(tmp_path):
    """A clean dataset: one patient per class in each split, 2 slides x 2 patches, 16x16."""
    return write_opensrh(tmp_path / "opensrh")


def add_patient(fx, pid: str, like: str, parts=("train",), label: str | None = None) -> dict:
    """Add patient ``pid`` copying the entry (and files) of patient ``like``; returns its entry."""
    meta, split = fx.edited()
    entry = copy.deepcopy(meta[like])
    if label is not None:
        entry["class"] = label
    meta[pid] = entry
    for part in parts:
        split[part].append(pid)
    fx.write_meta(meta, split)
    return entry


def codes(report) -> dict[str, int]:
    return dict(report.codes())


# ---------------------------------------------------------------------------- clean dataset
def test_clean_dataset_is_trainable_without_findings(fx):
    report = validate_opensrh(fx.root)
    assert report.trainable, report.to_text()
    assert report.findings == []
    assert report.files_checked == len(fx.used_patches()) == 7 * 2 * 2 * 2
    assert report.majority_size == (16, 16)
    for part in ("train", "val"):
        for label in CLASSES_OPENSRH:
            cell = report.counts[(part, label)]
            assert (cell.patients, cell.slides, cell.patches) == (1, 2, 4)
            assert (cell.usable_patients, cell.usable_slides, cell.usable_patches) == (1, 2, 4)
            assert cell.bad_patches == 0
    text = report.to_text()
    assert "findings: 0 error(s), 0 warning(s)" in text
    assert text.splitlines()[-1] == "verdict: TRAINABLE"


# ---------------------------------------------------------------------------- file faults
@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("missing", "missing_file"),
        ("garbage", "unreadable_tiff"),
        ("truncated", "truncated_tiff"),
        ("three_channels", "wrong_shape"),
        ("channel_last", "channel_last"),
        ("uint8", "wrong_dtype"),
        ("float32", "wrong_dtype"),
    ],
)
def test_bad_file_is_one_error_and_dataset_stays_trainable(fx, fault, code):
    rel = fx.used_patches(fx.patients("hgg", "train")[0])[1]
    fx.break_patch(rel, fault)
    report = validate_opensrh(fx.root, workers=2)
    assert [(f.severity, f.code, f.path) for f in report.findings] == [("error", code, rel)]
    assert report.trainable
    assert report.counts[("train", "hgg")].bad_patches == 1
    assert report.counts[("train", "hgg")].usable_patches == 3
    text = report.to_text()
    assert rel in text and code in text
    assert "TRAINABLE after cleaning" in text.splitlines()[-1]


def test_odd_size_is_warning_and_expected_size_makes_it_an_error(fx):
    rel = fx.used_patches()[0]
    fx.break_patch(rel, "size")
    report = validate_opensrh(fx.root)
    assert [(f.severity, f.code, f.path) for f in report.findings] == [("warning", "odd_size", rel)]
    assert report.trainable
    strict = validate_opensrh(fx.root, expected_size=16)
    assert [(f.severity, f.code, f.path) for f in strict.findings] == [("error", "wrong_size", rel)]
    wrong = validate_opensrh(fx.root, expected_size=300)
    assert not wrong.trainable
    assert codes(wrong)["wrong_size"] == len(fx.used_patches())


def test_nondiagnostic_files_checked_only_when_asked(fx):
    meta = fx.meta[fx.patients("lgg", "val")[0]]
    rel = next(iter(meta["slides"].values()))["nondiagnostic_patches"][0]
    fx.break_patch(rel, "garbage")
    assert validate_opensrh(fx.root).findings == []
    report = validate_opensrh(fx.root, include_nondiagnostic=True)
    assert [(f.code, f.path) for f in report.findings] == [("unreadable_tiff", rel)]


def test_check_images_false_skips_files(fx):
    fx.break_patch(fx.used_patches()[0], "missing")
    report = validate_opensrh(fx.root, check_images=False)
    assert report.findings == [] and report.trainable and report.files_checked == 0
    assert "not checked" in report.to_text()


def test_patient_with_no_usable_patch_is_dropped(fx):
    meta, split = fx.edited()
    missing = [f"studies/NIO_900/1/patches/NIO_900-1-0_0_{i}_0.tif" for i in (0, 300)]
    lists = {"tumor_patches": missing, "normal_patches": [], "nondiagnostic_patches": []}
    meta["NIO_900"] = {"class": "mening", "slides": {"1": lists}}
    split["train"].append("NIO_900")
    fx.write_meta(meta, split)
    report = validate_opensrh(fx.root)
    assert codes(report) == {"missing_file": 2, "empty_slide": 1, "no_usable_patches": 1}
    (finding,) = report.by_code("no_usable_patches")
    assert (finding.severity, finding.patient) == ("error", "NIO_900")
    assert report.trainable, report.to_text()
    assert report.counts[("train", "mening")].usable_patients == 1
    assert report.counts[("train", "mening")].patients == 2
    assert "NIO_900" not in report.clean_meta
    assert "NIO_900" not in report.clean_split["train"]


def test_patient_with_empty_used_list_has_no_usable_patches(fx):
    meta, split = fx.edited()
    meta["NIO_901"] = copy.deepcopy(meta[fx.patients("hgg", "train")[0]])
    meta["NIO_901"]["class"] = "normal"  # its patches are all in tumor_patches
    split["train"].append("NIO_901")
    fx.write_meta(meta, split)
    report = validate_opensrh(fx.root)
    assert [f.patient for f in report.by_code("no_usable_patches")] == ["NIO_901"]
    assert report.trainable


# ---------------------------------------------------------------------------- metadata faults
def test_unknown_class_patient_dropped(fx):
    add_patient(fx, "NIO_902", like=fx.patients("hgg", "train")[0], label="glioma")
    report = validate_opensrh(fx.root)
    assert [(f.code, f.patient) for f in report.errors] == [("unknown_class", "NIO_902")]
    assert "glioma" in report.errors[0].message
    assert report.trainable
    assert "NIO_902" not in report.clean_meta


@pytest.mark.parametrize(
    ("edit", "code", "severity"),
    [
        (lambda e: e.pop("class"), "bad_patient_entry", "error"),
        (lambda e: e.update(slides=["1"]), "bad_patient_entry", "error"),
        (lambda e: e["slides"].update({"99": "oops"}), "bad_slide_entry", "error"),
        (
            lambda e: next(iter(e["slides"].values())).update(tumor_patches="a.tif"),
            "bad_patch_list",
            "error",
        ),
        (
            lambda e: next(iter(e["slides"].values()))["tumor_patches"].append(7),
            "bad_patch_list",
            "error",
        ),
        (
            lambda e: next(iter(e["slides"].values())).pop("tumor_patches"),
            "missing_patch_list",
            "warning",
        ),
    ],
    ids=[
        "no-class",
        "slides-list",
        "slide-not-object",
        "list-is-string",
        "non-string-item",
        "list-missing",
    ],
)
def test_malformed_patient_entries(fx, edit, code, severity):
    meta, split = fx.edited()
    entry = copy.deepcopy(meta[fx.patients("pituita", "val")[0]])
    edit(entry)
    meta["NIO_903"] = entry
    split["val"].append("NIO_903")
    fx.write_meta(meta, split)
    report = validate_opensrh(fx.root)
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1 and found[0].patient == "NIO_903" and found[0].severity == severity
    assert report.trainable
    # whatever survives of the entry is readable by the reader
    out = os.path.join(fx.root, "..", "clean")
    meta_out, split_out = report.write_clean_meta(out)
    read_opensrh(fx.root, meta_file=meta_out, split_file=split_out)


def test_patient_in_both_splits_dropped_from_both(fx):
    add_patient(fx, "NIO_904", like=fx.patients("schwan", "val")[0], parts=("train", "val"))
    report = validate_opensrh(fx.root)
    assert [(f.code, f.patient) for f in report.errors] == [("in_both_splits", "NIO_904")]
    assert report.trainable
    assert "NIO_904" not in report.clean_meta
    assert all("NIO_904" not in report.clean_split[p] for p in ("train", "val"))


def test_patient_in_both_splits_can_leave_a_class_untrainable(fx):
    meta, split = fx.edited()
    split["val"].append(fx.patients("lgg", "train")[0])
    fx.write_meta(meta, split)
    report = validate_opensrh(fx.root)
    assert "in_both_splits" in codes(report)
    assert not report.trainable
    assert "lgg" in report.verdict()


def test_patient_in_neither_split_is_only_a_warning(fx):
    add_patient(fx, "NIO_905", like=fx.patients("hgg", "train")[0], parts=())
    report = validate_opensrh(fx.root)
    assert [(f.severity, f.code, f.patient) for f in report.findings] == [
        ("warning", "not_in_split", "NIO_905")
    ]
    assert report.trainable
    assert report.to_text().splitlines()[-1] == "verdict: TRAINABLE (1 warning(s))"
    assert report.unassigned.patients == 1


def test_split_patient_absent_from_metadata(fx):
    meta, split = fx.edited()
    split["train"] += ["NIO_404", "NIO_404"]
    fx.write_meta(meta, split)
    report = validate_opensrh(fx.root)
    assert [(f.code, f.patient) for f in report.errors] == [("not_in_metadata", "NIO_404")]
    assert [(f.code, f.patient) for f in report.warnings] == [("duplicate_in_split", "NIO_404")]
    assert report.trainable
    assert "NIO_404" not in report.clean_split["train"]


def test_class_absent_from_val_is_not_trainable(fx):
    meta, split = fx.edited()
    gone = fx.patients("schwan", "val")[0]
    del meta[gone]
    split["val"].remove(gone)
    fx.write_meta(meta, split)
    report = validate_opensrh(fx.root)
    assert not report.trainable
    assert [(f.code, f.message) for f in report.errors] == [
        ("class_missing_in_split", "class 'schwan' has no usable patient in val")
    ]
    assert "NOT TRAINABLE" in report.verdict() and "schwan" in report.verdict()
    assert cli_main(["root=" + fx.root]) == 1


def test_smaller_class_list_is_respected(fx):
    report = validate_opensrh(fx.root, classes=("hgg", "lgg"))
    assert codes(report) == {"unknown_class": 10}
    assert report.trainable


def test_malformed_json_is_one_fatal_finding(fx):
    fx.write_raw_meta('{"NIO_001": {"class": "hgg",')
    report = validate_opensrh(fx.root)
    assert not report.trainable
    assert len(report.findings) == 1
    finding = report.findings[0]
    assert finding.code == "meta_unreadable" and "invalid JSON" in finding.message
    assert "opensrh.json" in finding.path
    with pytest.raises(HLSSError, match="could not be read"):
        report.write_clean_meta(os.path.join(fx.root, "..", "clean"))


@pytest.mark.parametrize(
    ("which", "content", "code"),
    [
        ("split", None, "meta_unreadable"),
        ("meta", "[1, 2]", "meta_structure"),
        ("split", '{"train": []}', "meta_structure"),
    ],
)
def test_broken_metadata_files(fx, which, content, code):
    path = fx.split_path if which == "split" else fx.meta_path
    if content is None:
        os.remove(path)
    else:
        with open(path, "w") as handle:
            handle.write(content)
    report = validate_opensrh(fx.root)
    assert [f.code for f in report.findings] == [code]
    assert not report.trainable
    assert report.to_text().splitlines()[-1].startswith("verdict: NOT TRAINABLE")


def test_nothing_usable(fx):
    for rel in fx.used_patches():
        fx.break_patch(rel, "missing")
    report = validate_opensrh(fx.root, workers=3)
    assert not report.trainable
    assert "nothing usable remains" in report.reasons
    assert codes(report)["missing_file"] == len(fx.used_patches())


def test_report_text_limits_examples(fx):
    for rel in fx.used_patches()[:4]:
        fx.break_patch(rel, "missing")
    text = validate_opensrh(fx.root).to_text(max_examples=2)
    assert "missing_file x4" in text
    assert "... and 2 more" in text
    assert text.count(": file not found") == 2


def test_bad_arguments_raise(fx, tmp_path):
    with pytest.raises(HLSSError, match="not found"):
        validate_opensrh(tmp_path / "nope")
    with pytest.raises(HLSSError, match="workers"):
        validate_opensrh(fx.root, workers=-1)


# ---------------------------------------------------------------------------- cleaned metadata
def faulty(fx) -> set[str]:
    """Inject several faults; returns the relative paths of the good patches that must remain."""
    meta, split = fx.edited()
    meta["NIO_910"] = copy.deepcopy(meta[fx.patients("hgg", "train")[0]])
    meta["NIO_910"]["class"] = "glioma"
    split["train"].append("NIO_910")
    meta["NIO_911"] = copy.deepcopy(meta[fx.patients("lgg", "val")[0]])
    split["train"].append("NIO_911")
    split["val"].append("NIO_911")
    meta["NIO_912"] = {
        "class": "metast",
        "slides": {
            "5": {
                "tumor_patches": ["studies/x.tif"],
                "normal_patches": [],
                "nondiagnostic_patches": [],
            }
        },
    }
    split["val"].append("NIO_912")
    fx.write_meta(meta, split)
    bad = [fx.used_patches()[i] for i in (0, 5, 9)]
    for rel, fault in zip(bad, ("missing", "garbage", "truncated"), strict=True):
        fx.break_patch(rel, fault)
    good = set()
    for pid in fx.split["train"] + fx.split["val"]:
        if pid not in ("NIO_910", "NIO_911", "NIO_912"):
            good.update(fx.used_patches(pid))
    return good - set(bad)


def snapshot(fx) -> dict[str, bytes]:
    out = {}
    for path in (fx.meta_path, fx.split_path):
        with open(path, "rb") as handle:
            out[path] = handle.read()
    return out


def test_write_clean_meta_keeps_only_good_entries(fx, tmp_path):
    good = faulty(fx)
    before = snapshot(fx)
    report = validate_opensrh(fx.root, workers=2)
    assert report.trainable
    assert {
        "unknown_class",
        "in_both_splits",
        "missing_file",
        "unreadable_tiff",
        "truncated_tiff",
    } <= set(codes(report))
    meta_out, split_out = report.write_clean_meta(tmp_path / "clean")
    assert os.path.isabs(meta_out) and os.path.isfile(split_out)
    table = read_opensrh(fx.root, meta_file=meta_out, split_file=split_out)
    assert {os.path.relpath(p, fx.root) for p in table.frame["path"]} == good
    assert not {"NIO_910", "NIO_911", "NIO_912"} & set(table.frame["patient"])
    # the cleaned copy validates without errors
    again = validate_opensrh(fx.root, meta_file=meta_out, split_file=split_out)
    assert again.errors == [] and again.trainable
    assert snapshot(fx) == before
    # never overwrite, never into the dataset's own meta folder
    with pytest.raises(HLSSError, match="already exists"):
        report.write_clean_meta(tmp_path / "clean")
    with pytest.raises(HLSSError, match="own metadata folder"):
        report.write_clean_meta(os.path.join(fx.root, "meta"))
    assert snapshot(fx) == before


def test_write_clean_meta_refuses_existing_split_file(fx, tmp_path):
    report = validate_opensrh(fx.root)
    out = tmp_path / "clean"
    out.mkdir()
    (out / "train_val_split.json").write_text("mine")
    with pytest.raises(HLSSError, match=r"train_val_split\.json: already exists"):
        report.write_clean_meta(out)
    assert (out / "train_val_split.json").read_text() == "mine"
    assert not (out / "opensrh.json").exists()


# ---------------------------------------------------------------------------- console script
def test_cli_exit_codes_and_report(fx, tmp_path, capsys):
    assert cli_main(["root=" + fx.root, "workers=0"]) == 0
    assert "verdict: TRAINABLE" in capsys.readouterr().out

    rel = fx.used_patches()[3]
    fx.break_patch(rel, "channel_last")
    out = tmp_path / "clean"
    # an error: training would drop the file, so the check fails (1) though the verdict says how
    # to train after cleaning, and the cleaned copy is written
    assert cli_main([f"root={fx.root}", f"clean_out={out}", "expected_size=16"]) == 1
    text = capsys.readouterr().out
    assert rel in text and "channel_last" in text
    assert "verdict: TRAINABLE after cleaning" in text
    assert (out / "opensrh.json").is_file()
    assert "dataset.table.meta_file=" in text

    # usage errors exit 2 with one line
    for argv in (
        [f"root={fx.root}", f"clean_out={out}"],  # would overwrite
        [f"root={fx.root}", f"clean_out={os.path.join(fx.root, 'meta')}"],
        [f"root={fx.root}", "dataset=tcga"],
        [f"root={fx.root}", "bogus=1"],
        ["root=" + str(tmp_path / "missing")],
        [],
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("strict", "expected"), [("strict=false", 0), ("strict=true", 1)], ids=["lenient", "strict"]
)
def test_cli_warnings_only_fail_under_strict(fx, capsys, strict, expected):
    add_patient(fx, "NIO_905", like=fx.patients("hgg", "train")[0], parts=())  # a warning
    assert cli_main([f"root={fx.root}", "workers=0", strict]) == expected
    out = capsys.readouterr().out
    assert "verdict: TRAINABLE (1 warning(s))" in out
    assert ("strict=true: the 1 warning(s) fail the check" in out) == (expected == 1)


def test_cli_clean_dataset_passes_under_strict(fx, capsys):
    assert cli_main([f"root={fx.root}", "workers=0", "strict=true"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "verdict: TRAINABLE"


def test_exit_status_follows_the_severities(fx):
    report = validate_opensrh(fx.root, check_images=False)
    assert (report.exit_status(), report.exit_status(strict=True)) == (0, 0)
    report.findings.append(Finding.of("not_in_split", "unused", patient="NIO_905"))
    assert (report.exit_status(), report.exit_status(strict=True)) == (0, 1)
    report.findings.append(Finding.of("missing_file", "gone", path="a.tif"))
    assert report.trainable  # an error that cleaning removes still fails the check
    assert (report.exit_status(), report.exit_status(strict=True)) == (1, 1)


def test_cli_subprocess_malformed_json_exits_1_without_traceback(fx):
    fx.write_raw_meta("{ not json")
    proc = subprocess.run(
        [sys.executable, "-m", "hlss.cli.validate", f"root={fx.root}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "meta_unreadable" in proc.stdout and "NOT TRAINABLE" in proc.stdout
