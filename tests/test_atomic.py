"""Atomic file and folder writes."""

from __future__ import annotations

import os

import pytest

from hlss.atomic import atomic_file, publish_dir, temp_dir_beside


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    with atomic_file(target, "w") as handle:
        handle.write("one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_file(target, "w") as handle:
        handle.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "one"
    assert os.listdir(target.parent) == ["f.txt"]  # no temporary left behind


def test_publish_dir_and_race(tmp_path):
    target = str(tmp_path / "set")
    first = temp_dir_beside(target)
    assert os.path.basename(first).startswith(".set.partial-")
    (tmp_path / first / "a").write_text("1")
    assert publish_dir(first, target)
    second = temp_dir_beside(target)
    (tmp_path / second / "a").write_text("2")
    assert not publish_dir(second, target)  # lost the race: the winner's copy stays
    assert (tmp_path / "set" / "a").read_text() == "1"
    assert not os.path.exists(second)
    empty = tmp_path / "empty"
    empty.mkdir()
    third = temp_dir_beside(str(empty))
    assert publish_dir(third, str(empty))  # an empty target folder is replaced
