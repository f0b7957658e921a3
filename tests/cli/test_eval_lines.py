"""The lines `hlss-eval` prints about its attribute explanations."""

from __future__ import annotations

from hlss.cli.eval import format_explain_quality


def test_explain_lines_name_every_level_in_order():
    quality = {
        "patient": {"class_information": 0.54, "trust_high": 0.0, "trust_medium": 0.0},
        "patch": {"class_information": 0.334, "trust_high": 0.01, "trust_medium": 0.04},
        "slide": {"class_information": 0.5, "trust_high": 0.0, "trust_medium": 0.25},
    }
    lines = format_explain_quality(quality).splitlines()
    assert lines[0].endswith("patch 0.33, slide 0.50, patient 0.54")
    assert lines[1].endswith("patch 5%, slide 25%, patient 0%")


def test_explain_lines_without_class_labels_or_explanations():
    lines = format_explain_quality({"slide": {"trust_high": 0.5, "trust_medium": 0.0}})
    assert lines.splitlines() == ["explanations trusted (medium or high, beyond chance): slide 50%"]
    assert format_explain_quality({}) == ""
