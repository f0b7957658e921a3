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


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_written_files_and_folders_get_the_umask_permissions(tmp_path, umask):
    from hlss.atomic import current_umask, file_mode

    assert current_umask() == umask
    assert file_mode() == 0o666 & ~umask  # 0o644 or 0o640, never mkstemp's 0o600
    target = tmp_path / "new" / "metrics.json"
    with atomic_file(target, "w") as handle:
        handle.write("{}")
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o777 & ~umask
    # a plain open() gives the same permissions: written like any other file of the user
    (tmp_path / "plain").write_text("x")
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    with atomic_file(target, "w") as handle:  # rewriting keeps them
        handle.write("{}")
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    folder = temp_dir_beside(str(tmp_path / "set"))
    (tmp_path / folder / "a").write_text("1")
    assert publish_dir(folder, str(tmp_path / "set"))
    assert (tmp_path / "set").stat().st_mode & 0o777 == 0o777 & ~umask


def test_umask_read_without_proc_is_restored(monkeypatch, umask):
    import hlss.atomic as atomic

    monkeypatch.setattr(atomic, "_umask_from_proc", lambda: None)
    atomic._umask_set_and_restore.cache_clear()
    try:
        assert atomic.current_umask() == umask
        assert os.umask(umask) == umask  # unchanged by reading it
    finally:
        atomic._umask_set_and_restore.cache_clear()
