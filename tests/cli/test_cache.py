"""``hlss-cache``: listing and clearing a cache generated in a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from hlss.cache_admin import KINDS, clear, scan, totals
from hlss.cli import cache as cache_cli

from .console import console, hydra_leftovers, one_error_line

SYNTH = {
    "size": 16,
    "patients_per_class": 2,
    "slides_per_patient": 1,
    "patches_per_slide": 1,
    "nondiagnostic_per_slide": 0,
}
DAY = 24 * 3600


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A cache made by hlss itself: one synthetic dataset, train and val embeddings of a tiny
    model "checkpoint" (backbone source), one text-embedding file."""
    from torch import nn

    from hlss.data.synthetic import synthetic_table
    from hlss.data.transforms import BaseTransform
    from hlss.eval.embed import cached_embeddings
    from hlss.models.text import TinyTextEncoder, embed_prompts

    root = tmp_path_factory.mktemp("built") / "cache"
    table = synthetic_table(cache_dir=str(root), **SYNTH)
    ckpt = root.parent / "run" / "model.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    sets = {
        split: cached_embeddings(
            model,
            str(ckpt),
            table,
            BaseTransform("srh"),
            split,
            cache_dir=str(root),
            batch_size=16,
            num_workers=0,
            device="cpu",
            progress_bar=False,
        )
        for split in ("train", "val")
    }
    embed_prompts(TinyTextEncoder(dim=8), [["a tumor"], ["normal brain"]], str(root / "text"))
    return {"root": root, "ckpt": str(ckpt), "sets": sets, "patches": len(table)}


@pytest.fixture
def cache(built, tmp_path, monkeypatch):
    """A private copy of the built cache (times kept) as $HLSS_CACHE, and a file beside it."""
    root = tmp_path / "cache"
    shutil.copytree(built["root"], root)
    (tmp_path / "mine.txt").write_text("keep")
    monkeypatch.setenv("HLSS_CACHE", str(root))
    return root


def tree(path) -> dict:
    return {
        os.path.relpath(os.path.join(d, n), path): os.path.getsize(os.path.join(d, n))
        for d, _, names in os.walk(path)
        for n in names
    }


def run(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert cache_cli.main(list(argv)) == 0
    return capsys.readouterr().out


def test_scan_describes_every_entry(cache, built):
    inventory = scan()
    assert inventory.root == str(cache) and inventory.foreign == ()
    by_kind = {kind: [e for e in inventory.entries if e.kind == kind] for kind in KINDS}
    assert [len(by_kind[k]) for k in KINDS] == [2, 1, 1]
    embeddings = {e.split: e for e in by_kind["embeddings"]}
    for split, entry in embeddings.items():
        assert entry.rows == len(built["sets"][split]) > 0
        assert entry.checkpoint == built["ckpt"] and entry.source == "backbone"
        assert entry.size == sum(tree(entry.path).values())
        assert os.path.basename(entry.path) == built["sets"][split].manifest["cache_key"]
    assert sum(e.rows for e in by_kind["embeddings"]) == built["patches"]
    (synthetic,) = by_kind["synthetic"]
    assert synthetic.rows == built["patches"]  # one .tif per patch (no nondiagnostic)
    assert totals(inventory.entries)["text"] == (1, by_kind["text"][0].size)
    assert sum(b for _, b in totals(inventory.entries).values()) == sum(tree(cache).values())


def test_listing_shows_entries_and_totals(cache, built, capsys):
    out = run(capsys)
    lines = out.splitlines()
    assert lines[0] == f"cache {cache}"
    rows = [line for line in lines if line.startswith("embeddings ")]
    assert len(rows) == 2 and all(built["ckpt"] in line for line in rows)
    assert any(" train " in line for line in rows) and any(" val " in line for line in rows)
    assert any(line.startswith("text ") for line in lines)
    assert any(line.startswith("synthetic ") for line in lines)
    (total,) = [line for line in lines if line.startswith("total ")]
    assert "total 4 entries" in total and "embeddings 2" in total and "synthetic 1" in total


def test_dry_run_deletes_nothing(cache, capsys):
    before = tree(cache.parent)
    out = run(capsys, "clear=all", "dry_run=true")
    assert out.count("would remove ") == 5  # 4 entries and the total line
    assert "would remove 4 entries" in out
    assert tree(cache.parent) == before


def test_clear_one_kind_keeps_the_others_and_everything_outside(cache, capsys):
    outside = cache.parent / "outside"
    outside.mkdir()
    (outside / "precious.npy").write_text("keep")
    # a link named like an entry, pointing outside: neither followed nor removed
    os.symlink(outside, cache / "embeddings" / ("f" * 32))
    out = run(capsys, "clear=embeddings")
    assert "removed 2 entries" in out
    assert [e.kind for e in scan().entries] == ["text", "synthetic"]
    assert (outside / "precious.npy").read_text() == "keep"
    assert (cache.parent / "mine.txt").read_text() == "keep"
    assert os.path.islink(cache / "embeddings" / ("f" * 32))
    run(capsys, "clear=all")
    assert scan().entries == ()
    assert (outside / "precious.npy").read_text() == "keep"


def test_older_than_days_spares_recently_used_entries(cache):
    old = next(e for e in scan().entries if e.kind == "embeddings")
    stamp = time.time() - 10 * DAY
    os.utime(os.path.join(old.path, "features.npy"), (stamp, stamp))
    _, removed = clear("all", older_than_days=5)
    assert [e.path for e in removed] == [old.path]
    assert not os.path.exists(old.path) and len(scan().entries) == 3


def test_partial_writes_go_only_when_stale(cache):
    partial = cache / "embeddings" / (".%s.partial-1-abcd" % ("0" * 32))
    partial.mkdir()
    (partial / "features.npy").write_bytes(b"x" * 10)
    _, removed = clear("embeddings")
    assert os.path.isdir(partial)  # may belong to a running evaluation
    assert len(removed) == 2
    stamp = time.time() - 2 * DAY
    os.utime(partial / "features.npy", (stamp, stamp))
    _, removed = clear("embeddings")
    assert [e.path for e in removed] == [str(partial)] and removed[0].partial


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path, monkeypatch, capsys):
    root = tmp_path / "home"
    (root / "embeddings" / ("a" * 32)).mkdir(parents=True)
    (root / "embeddings" / ("a" * 32) / "features.npy").write_bytes(b"1")
    (root / "thesis.tex").write_text("mine")
    monkeypatch.setenv("HLSS_CACHE", str(root))
    before = tree(root)
    with pytest.raises(SystemExit) as exc:
        cache_cli.main(["clear=all"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not look like an hlss cache" in err[0] and "thesis.tex" in err[0]
    assert tree(root) == before
    # listing is harmless and says what is not hlss's
    assert "not hlss's, left alone: thesis.tex" in run(capsys)


def test_missing_cache_lists_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HLSS_CACHE", str(tmp_path / "none"))
    assert "total 0 entries" in run(capsys)
    assert "removed 0 entries" in run(capsys, "clear=all")
    assert not (tmp_path / "none").exists()


def test_console_script_help_and_errors(cache, tmp_path):
    help_text = console("hlss-cache", "--help", cwd=tmp_path)
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("hlss-cache: list or clear")
    assert "$HLSS_CACHE" in help_text.stdout and "Powered by Hydra" not in help_text.stdout
    line = one_error_line(console("hlss-cache", "clear=models", cwd=tmp_path))
    assert "clear=models" in line and "embeddings" in line
    line = one_error_line(console("hlss-cache", "clear=all", "older_than_days=-1", cwd=tmp_path))
    assert "older_than_days" in line
    listing = console("hlss-cache", cwd=tmp_path)
    assert listing.returncode == 0 and f"cache {cache}" in listing.stdout
    assert hydra_leftovers(tmp_path) == []


def test_layout_names_match_the_writers(built):
    """The names hlss-cache recognises are the ones the caches are written under."""
    from hlss.cache_admin import SYNTHETIC_PREFIX
    from hlss.data.synthetic import CACHE_PREFIX

    assert SYNTHETIC_PREFIX == CACHE_PREFIX
    manifest = json.loads(
        (
            built["root"]
            / "embeddings"
            / built["sets"]["val"].manifest["cache_key"]
            / "manifest.json"
        ).read_text()
    )
    assert {"count", "split", "source", "checkpoint"} <= set(manifest)
