"""The SRH patch integrity check (``hlss.data.io.inspect_patch``), its worker pool and JSON loading."""

from __future__ import annotations

import os

import pytest

from hlss.data import validate
from hlss.data.io import PATCH_PROBLEMS, PatchVerdict, inspect_patch, load_json, tiff_truncation
from hlss.data.patch_scan import inspect_many
from hlss.data.report import CODES
from hlss.errors import DataError

from .opensrh_fixture import FAULTS, write_opensrh


@pytest.fixture
def fx(tmp_path):
    """Two classes, one patient each in train and val, 2 slides x 2 patches of 16x16."""
    return write_opensrh(tmp_path / "opensrh", classes=("hgg", "normal"))


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.9, -10])
def test_truncated_tiff_detected_wherever_cut(fx, keep):
    rel = fx.used_patches()[0]
    path = fx.abspath(rel)
    with open(path, "rb") as handle:
        data = handle.read()
    n = int(len(data) * keep) if keep > 0 else len(data) + keep
    with open(path, "wb") as handle:
        handle.write(data[:n])
    code, message, size = inspect_patch(path)
    assert (code, size) == ("truncated_tiff", None), message
    assert "truncated" in message


def test_good_patch_inspects_clean(fx):
    assert inspect_patch(fx.abspath(fx.used_patches()[0])) == ("", "", (16, 16))


def test_validator_reexports_the_io_check():
    assert validate.inspect_patch is inspect_patch


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
def test_each_fault_has_its_code(fx, fault, code):
    assert fault in FAULTS
    path = fx.break_patch(fx.used_patches()[0], fault)
    verdict = inspect_patch(path)
    assert isinstance(verdict, PatchVerdict)
    assert (verdict.code, verdict.size, verdict.ok) == (code, None, False)
    assert verdict.message
    assert code in PATCH_PROBLEMS and CODES[code][0] == "error"


def test_folder_is_not_a_patch(tmp_path):
    assert inspect_patch(str(tmp_path)) == ("missing_file", "not a regular file", None)


def test_tiff_truncation_of_whole_and_cut_files(fx):
    with open(fx.abspath(fx.used_patches()[0]), "rb") as handle:
        data = handle.read()
    assert tiff_truncation(data) is None
    assert tiff_truncation(b"not a tiff at all") is None  # tifffile says why
    assert "shorter than a TIFF header" in tiff_truncation(data[:5])
    assert "beyond the end of the file" in tiff_truncation(data[:-10])


@pytest.mark.parametrize("workers", [0, 2])
def test_inspect_many_keeps_order_and_reports_progress(fx, workers):
    paths = [fx.abspath(rel) for rel in fx.used_patches()]
    fx.break_patch(fx.used_patches()[2], "garbage")
    seen = []
    verdicts = list(inspect_many(paths, workers, lambda done, total: seen.append((done, total))))
    assert [v.code for v in verdicts] == [
        "unreadable_tiff" if i == 2 else "" for i in range(len(paths))
    ]
    assert seen[-1] == (len(paths), len(paths))


def test_inspect_many_custom_judge_runs_in_threads():
    paths = [f"p{i}" for i in range(200)]  # more than one chunk per worker
    verdicts = list(inspect_many(paths, workers=3, inspect=lambda p: (p, "", None)))
    assert [v[0] for v in verdicts] == paths


def test_load_json_errors_are_one_line(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert load_json(str(good)) == {"a": [1, 2]}
    with pytest.raises(DataError, match="file not found"):
        load_json(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": \n [1,')
    with pytest.raises(DataError, match=r"bad.json: invalid JSON at line 2") as err:
        load_json(str(bad))
    assert "\n" not in str(err.value)
    assert os.path.isfile(bad)
