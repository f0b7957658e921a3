"""The validator's passes one at a time, on small in-memory metadata (no file unless named)."""

from __future__ import annotations

import pytest

from hlss.data.report import CODES, Counts, Finding, ValidationReport
from hlss.data.validate import (
    FileVerdicts,
    check_files,
    class_coverage,
    judge_patients,
    patient_lists,
    split_membership,
    used_files,
)

from .opensrh_fixture import write_opensrh


def lists(tumor=(), normal=(), nondiag=()) -> dict:
    return {
        "tumor_patches": list(tumor),
        "normal_patches": list(normal),
        "nondiagnostic_patches": list(nondiag),
    }


def test_finding_severity_comes_from_its_code():
    f = Finding.of("odd_size", "size 4x4", "P1", 7, "a.tif")
    assert (f.severity, f.slide, f.where()) == ("warning", "7", "P1/7 a.tif")
    assert Finding.of("missing_file", "gone").severity == "error"
    assert all(severity in ("error", "warning") for severity, _ in CODES.values())
    with pytest.raises(KeyError):
        Finding.of("no_such_code", "x")


def test_split_membership():
    findings: list[Finding] = []
    member = split_membership(
        {"train": ["A", "B", "A", 3], "val": ["B", "C"]}, {"A": {}, "B": {}}, findings
    )
    assert member == {"A": "train", "B": "both", "C": "val"}
    assert [(f.code, f.patient) for f in findings] == [
        ("duplicate_in_split", "A"),
        ("bad_split_entry", ""),
        ("in_both_splits", "B"),
        ("not_in_metadata", "C"),
    ]


def test_patient_lists_and_used_files():
    meta = {
        "A": {"class": "hgg", "slides": {"1": lists(["a", "b", "a"], ["n"]), "2": "bad"}},
        "B": {"class": "normal", "slides": {"1": {"normal_patches": ["b", "c", 5]}}},
        "C": {"class": "glioma", "slides": {}},
        "D": {"class": "hgg"},
        "E": {"class": "hgg", "slides": {"1": lists(["e"])}},
        "F": {"class": "normal", "slides": {"1": {"tumor_patches": ["f"]}}},
    }
    findings: list[Finding] = []
    member = {"A": "train", "B": "val", "C": "train", "D": "val", "F": "val"}
    kept = patient_lists(meta, member, ("hgg", "normal"), False, findings)
    assert list(kept) == ["A", "B", "E", "F"]
    assert (kept["A"].label, kept["A"].part, kept["E"].part) == ("hgg", "train", "none")
    assert kept["A"].slides == {"1": lists(["a", "b"], ["n"])}
    assert kept["B"].slides["1"] == lists([], ["b", "c"])  # missing lists become empty
    assert kept["F"].slides["1"] == lists(["f"])
    assert [(f.code, f.patient, f.slide) for f in findings] == [
        ("duplicate_patch", "A", "1"),
        ("bad_slide_entry", "A", "2"),
        ("bad_patch_list", "B", "1"),
        ("unknown_class", "C", ""),
        ("bad_patient_entry", "D", ""),
        ("not_in_split", "E", ""),
        ("missing_patch_list", "F", "1"),  # only the list a patient uses must be there
    ]
    # distinct paths of the used lists only, first occurrence first
    assert used_files(kept, include_nondiagnostic=False) == ["a", "b", "c", "e"]


def test_judge_patients_applies_file_verdicts():
    meta = {
        "A": {"class": "hgg", "slides": {"1": lists(["a", "b"]), "2": lists(["c"])}},
        "B": {"class": "hgg", "slides": {"1": lists(["d"])}},
    }
    kept = patient_lists(meta, {"A": "train", "B": "val"}, ("hgg",), False, [])
    files = FileVerdicts(
        bad={"c": ("missing_file", "file not found"), "d": ("wrong_dtype", "uint8")},
        odd={"b": (8, 8)},
        majority_size=(16, 16),
        files_checked=4,
    )
    findings: list[Finding] = []
    counts, unassigned, clean = judge_patients(kept, files, ("hgg",), False, findings)
    assert [(f.code, f.patient, f.path) for f in findings] == [
        ("odd_size", "A", "b"),
        ("missing_file", "A", "c"),
        ("empty_slide", "A", ""),
        ("wrong_dtype", "B", "d"),
        ("empty_slide", "B", ""),
        ("no_usable_patches", "B", ""),
    ]
    assert counts[("train", "hgg")] == Counts(1, 2, 3, 1, 1, 2, 1)
    assert counts[("val", "hgg")] == Counts(1, 1, 1, 0, 0, 0, 1)
    assert unassigned == Counts()
    assert clean == {"A": {"class": "hgg", "slides": {"1": lists(["a", "b"]), "2": lists()}}}


def test_class_coverage():
    counts = {(p, c): Counts() for p in ("train", "val") for c in ("x", "y")}
    findings: list[Finding] = []
    assert class_coverage(counts, ("x", "y"), "m.json", findings) == ["nothing usable remains"]
    assert [(f.code, f.path) for f in findings] == [("nothing_usable", "m.json")]
    counts[("train", "x")].usable_patients = counts[("val", "x")].usable_patients = 1
    counts[("train", "y")].usable_patients = 1
    findings = []
    reasons = class_coverage(counts, ("x", "y"), "m.json", findings)
    assert reasons == ["no usable val patient for class(es) y (cannot evaluate them)"]
    assert [f.message for f in findings] == ["class 'y' has no usable patient in val"]


def test_check_files_sizes(tmp_path):
    fx = write_opensrh(tmp_path / "ds", classes=("hgg",))
    rels = fx.used_patches()
    fx.break_patch(rels[1], "size")
    loose = check_files(fx.root, rels)
    assert (loose.files_checked, loose.majority_size, loose.bad) == (len(rels), (16, 16), {})
    assert loose.odd == {rels[1]: (20, 20)}
    strict = check_files(fx.root, rels, expected_size=16)
    assert strict.bad == {rels[1]: ("wrong_size", "size 20x20, expected 16x16")}
    assert strict.odd == {}
    assert check_files(fx.root, []) == FileVerdicts()


def test_report_text_without_counts_lists_findings_and_verdict():
    report = ValidationReport("/r", "/r/m.json", "/r/s.json", ("x",), check_images=False)
    report.findings.append(Finding.of("meta_unreadable", "/r/m.json: file not found"))
    report.reasons.append("metadata could not be read")
    text = report.to_text()
    assert "counts" not in text and "not checked" in text
    assert "[error] meta_unreadable x1" in text
    assert text.splitlines()[-1] == "verdict: NOT TRAINABLE - metadata could not be read"
