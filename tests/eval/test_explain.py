"""Attribute retrieval at patch, slide and patient level on hand-made vectors."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from hlss.errors import HLSSError
from hlss.eval.explain import (
    COLUMNS,
    NULL_DRAWS,
    NULL_SEED,
    READOUTS,
    TRUST_QUANTILES,
    TrustNull,
    calibrate_trust,
    contradictions,
    explain_levels,
    explanation_quality,
    format_examples,
    null_top_z,
    readout_parts,
    top_attributes,
    trust_labels,
    write_explanations,
)
from hlss.levels import LEVELS
from hlss.models.attributes import AttributeBank

S2 = np.sqrt(2.0)
S3 = np.sqrt(3.0)
S6 = np.sqrt(6.0)

# ---------------------------------------------------------------------------------------------
# top_attributes


def test_top_attributes_order_and_scores():
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)  # a0, a1, a2
    names = ["a0", "a1", "a2"]
    x = np.array([[1.0, 0.2], [0.1, 1.0], [-1.0, 0.0]], dtype=np.float32)
    idx, scores = top_attributes(3 * x, 5 * bank, names, k=2)  # scale must not matter
    assert idx.dtype == np.int64 and scores.dtype == np.float32
    assert idx.tolist() == [[0, 2], [1, 2], [1, 2]]
    n0 = np.sqrt(1.04)
    np.testing.assert_allclose(scores[0], [1 / n0, 1.2 / (S2 * n0)], rtol=1e-5)
    # (-1, 0): a1 = 0 > a2 = -1/sqrt2 > a0 = -1; k larger than the bank is capped
    idx, scores = top_attributes(x, bank, names, k=10)
    assert idx.shape == (3, 3)
    assert idx[2].tolist() == [1, 2, 0]
    assert np.all(np.diff(scores, axis=1) <= 0)
    # exact ties are broken by the lower index
    idx, _ = top_attributes(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [0.0, -1.0]]), ["p", "q"])
    assert idx.tolist() == [[0, 1]]


def test_top_attributes_inputs_and_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    bank = rng.normal(size=(6, 8)).astype(np.float32)
    names = [f"a{i}" for i in range(6)]
    idx, scores = top_attributes(x, bank, names, k=3)
    idx16, scores16 = top_attributes(x.astype(np.float16), torch.from_numpy(bank), names, k=3)
    assert (idx16[:, 0] == idx[:, 0]).mean() > 0.9
    np.testing.assert_allclose(scores16, scores, atol=5e-3)
    idx_c, scores_c = top_attributes(x, bank, names, k=3, chunk_size=7)
    assert np.array_equal(idx_c, idx) and np.allclose(scores_c, scores)
    with pytest.raises(HLSSError, match="5 names but 6"):
        top_attributes(x, bank, names[:5])
    with pytest.raises(HLSSError, match="width 8"):
        top_attributes(x, bank[:, :4], names)
    with pytest.raises(ValueError, match="k must be"):
        top_attributes(x, bank, names, k=0)


# ---------------------------------------------------------------------------------------------
# explain_levels on a tiny hierarchy
#
# P1 / slide 1: patches e0, e1, e0      P1 / slide 2: patch e2
# P2 / slide 1: patches e1, (0.6, 0.8, 0)   (slide id "1" repeats across patients)
#
# slide means (renormalised):  P1/1 = (2,1,0)/sqrt5   P1/2 = e2   P2/1 = (0.6,1.8,0)/|.|
# patient means:               P1 = (2,1,1)/sqrt6      P2 = (0.6,1.8,0)/|.| = (1,3,0)/sqrt10
# (P1's patient mean is over its 4 patches, not over its 2 slide means.)


def _hierarchy():
    e0, e1, e2 = np.eye(3, dtype=np.float32)
    emb = np.stack([e0, e1, e0, e2, e1, np.array([0.6, 0.8, 0.0], np.float32)])
    index = pd.DataFrame(
        {
            "patient": ["P1", "P1", "P1", "P1", "P2", "P2"],
            "slide": ["1", "1", "1", "2", "1", "1"],
            "path": [f"studies/p{i}.tif" for i in range(6)],
            "label": ["hgg"] * 4 + ["lgg"] * 2,
            "label_index": [0] * 4 + [1] * 2,
            "split": ["val"] * 6,
        }
    )
    banks = {
        "patch": AttributeBank("patch", ["pa", "pb", "pc"], [["a"], ["b"], ["c"]]),
        "slide": AttributeBank("slide", ["s0", "s1", "s2", "s01"], [["x"]] * 4),
        "patient": AttributeBank("patient", ["t0", "t1", "t2", "t_mix"], [["y"]] * 4),
    }
    text = {
        "patch": torch.eye(3),
        "slide": torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1 / S2, 1 / S2, 0]]),
        "patient": torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1 / S3, 1 / S3, 1 / S3]]),
    }
    return emb, index, text, banks


def _expected():
    """(level, patient, slide, path) -> [(attribute, score), ...] for k=2, computed by hand."""
    s5, s10 = np.sqrt(5.0), np.sqrt(10.0)
    return {
        ("patch", "P1", "1", "studies/p0.tif"): [("pa", 1.0), ("pb", 0.0)],
        ("patch", "P1", "1", "studies/p1.tif"): [("pb", 1.0), ("pa", 0.0)],
        ("patch", "P1", "1", "studies/p2.tif"): [("pa", 1.0), ("pb", 0.0)],
        ("patch", "P1", "2", "studies/p3.tif"): [("pc", 1.0), ("pa", 0.0)],
        ("patch", "P2", "1", "studies/p4.tif"): [("pb", 1.0), ("pa", 0.0)],
        ("patch", "P2", "1", "studies/p5.tif"): [("pb", 0.8), ("pa", 0.6)],
        # (2,1,0)/sqrt5: s01 = 3/sqrt10, s0 = 2/sqrt5
        ("slide", "P1", "1", ""): [("s01", 3 / s10), ("s0", 2 / s5)],
        ("slide", "P1", "2", ""): [("s2", 1.0), ("s0", 0.0)],
        # (1,3,0)/sqrt10: s1 = 3/sqrt10, s01 = 4/sqrt20
        ("slide", "P2", "1", ""): [("s1", 3 / s10), ("s01", 4 / np.sqrt(20.0))],
        # (2,1,1)/sqrt6: t_mix = 4/sqrt18, t0 = 2/sqrt6
        ("patient", "P1", "", ""): [("t_mix", 4 / np.sqrt(18.0)), ("t0", 2 / S6)],
        # (1,3,0)/sqrt10: t1 = 3/sqrt10, t_mix = 4/sqrt30
        ("patient", "P2", "", ""): [("t1", 3 / s10), ("t_mix", 4 / np.sqrt(30.0))],
    }


def _as_dict(df: pd.DataFrame) -> dict:
    out: dict = {}
    for key, rows in df.groupby(["level", "patient", "slide", "path"], sort=False):
        rows = rows.sort_values("rank")
        out[key] = list(zip(rows["attribute"], rows["score"].astype(float), strict=True))
    return out


def _assert_matches(df, expected, atol=1e-5):
    got = _as_dict(df)
    assert set(got) == set(expected)
    for key, ranking in expected.items():
        assert [a for a, _ in got[key]] == [a for a, _ in ranking], key
        np.testing.assert_allclose([s for _, s in got[key]], [s for _, s in ranking], atol=atol)


def test_explain_levels_hand_computed():
    emb, index, text, banks = _hierarchy()
    df = explain_levels(emb, index, text, banks, k=2)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == (6 + 3 + 2) * 2
    # one row per (entity, rank), ranks 1..k
    assert df.groupby(["level", "patient", "slide", "path", "rank"]).size().max() == 1
    assert sorted(df["rank"].unique().tolist()) == [1, 2]
    assert df["level"].tolist() == ["patch"] * 12 + ["slide"] * 6 + ["patient"] * 4
    # patch rows follow the index order; slides and patients sorted by key
    assert df[df["level"] == "patch"]["path"].iloc[::2].tolist() == index["path"].tolist()
    slides = df[(df["level"] == "slide") & (df["rank"] == 1)]
    assert list(zip(slides["patient"], slides["slide"], strict=True)) == [
        ("P1", "1"),
        ("P1", "2"),
        ("P2", "1"),
    ]
    _assert_matches(df, _expected())


def test_explain_levels_order_dtype_chunks_and_patch_limit():
    emb, index, text, banks = _hierarchy()
    expected = _expected()
    perm = np.array([5, 2, 0, 3, 4, 1])
    shuffled = explain_levels(
        emb[perm].astype(np.float16),
        index.iloc[perm].reset_index(drop=True),
        text,
        banks,
        k=2,
        chunk_size=2,
    )
    _assert_matches(shuffled, expected, atol=2e-3)
    limited = explain_levels(torch.from_numpy(emb), index, text, banks, k=2, patches=2)
    patch_keys = {key for key in _as_dict(limited) if key[0] == "patch"}
    assert patch_keys == {
        ("patch", "P1", "1", "studies/p0.tif"),
        ("patch", "P1", "1", "studies/p1.tif"),
    }
    none = explain_levels(emb, index, text, banks, k=2, patches=0)
    assert set(none["level"]) == {"slide", "patient"}
    # only the levels of `banks` are explained; extra text embeddings are ignored
    only = explain_levels(emb, index, text, {"patient": banks["patient"]}, k=1)
    assert only["level"].tolist() == ["patient", "patient"]
    assert only["attribute"].tolist() == ["t_mix", "t1"]
    # k larger than a bank is capped at its size
    big = explain_levels(emb, index, text, banks, k=10)
    assert big.groupby("level")["rank"].max().to_dict() == {"patch": 3, "slide": 4, "patient": 4}


def test_explain_levels_errors():
    emb, index, text, banks = _hierarchy()
    with pytest.raises(HLSSError, match="index has 5 rows but there are 6"):
        explain_levels(emb, index.iloc[:5], text, banks)
    with pytest.raises(HLSSError, match="lacks column"):
        explain_levels(emb, index.drop(columns=["slide"]), text, banks)
    with pytest.raises(HLSSError, match="no text embeddings for level 'slide'"):
        explain_levels(emb, index, {"patch": text["patch"]}, banks)
    bad = dict(text, slide=text["slide"][:3])
    with pytest.raises(HLSSError, match="4 names but 3"):
        explain_levels(emb, index, bad, banks)
    with pytest.raises(HLSSError, match="unknown level"):
        explain_levels(emb, index, text, {"tile": banks["patch"]})


def test_write_and_format(tmp_path):
    emb, index, text, banks = _hierarchy()
    df = explain_levels(emb, index, text, banks, k=2)
    path = write_explanations(df, tmp_path / "out" / "explain.csv")
    back = pd.read_csv(path, keep_default_na=False, dtype={"slide": str, "patient": str})
    assert list(back.columns) == list(COLUMNS) and len(back) == len(df)
    assert back["attribute"].tolist() == df["attribute"].tolist()
    np.testing.assert_allclose(back["score"], df["score"], atol=1e-5)
    with pytest.raises(HLSSError, match="already exists"):
        write_explanations(df, path)
    write_explanations(df.iloc[:2], path, overwrite=True)
    assert len(pd.read_csv(path)) == 2

    text_block = format_examples(df, n_per_level=1)
    lines = text_block.splitlines()
    expected = [
        ("patch P1/1/p0.tif", "pa (1.00), pb (0.00)"),
        ("slide P1/1", "s01 (0.95), s0 (0.89)"),
        ("patient P1", "t_mix (0.94), t0 (0.82)"),
    ]
    firsts = df[df["rank"] == 1].groupby("level", sort=False).head(1)
    for line, (name, attrs), (_, row) in zip(lines, expected, firsts.iterrows(), strict=True):
        note = f"trust {row['trust']}, z {row['top_z']:.1f}"
        assert line == f"{name} [{note}]: {attrs}"
    assert len(format_examples(df, n_per_level=2).splitlines()) == 6
    assert format_examples(df.iloc[:0]) == "(no attribute explanations)"


def test_top_z_against_its_formula():
    rng = np.random.default_rng(0)
    emb, bank = rng.normal(size=(7, 6)), rng.normal(size=(9, 6))
    _, _, z = top_attributes(emb, bank, [str(i) for i in range(9)], k=3, return_z=True)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sims = e @ b.T
    ref = (sims.max(1) - sims.mean(1)) / sims.std(1)
    np.testing.assert_allclose(z, ref, rtol=1e-4)
    # a bank of identical attributes gives no signal at all
    _, _, flat = top_attributes(emb, np.ones((4, 6)), list("abcd"), return_z=True)
    assert np.all(flat == 0)


def test_contradictions_need_two_ranked_attributes_of_one_group():
    groups = ["cellularity", "cellularity", "necrosis", None, None]
    idx = np.array([[0, 1, 2], [0, 2, 3], [3, 4, 2], [1, 3, 0]])
    assert contradictions(idx, groups).tolist() == [True, False, False, True]
    # thresholds are given (explain_levels takes them from the level's null); a contradiction
    # forces low whatever the z
    z, contra = np.array([4.0, 4.0, 3.0, 1.0]), np.array([1, 0, 0, 0], bool)
    assert trust_labels(z, contra, z_medium=2.5, z_high=3.5).tolist() == [
        "low",
        "high",
        "medium",
        "low",
    ]
    # the thresholds must be exceeded: a z equal to one gets the label below it
    assert trust_labels(np.array([3.5, 2.5]), np.zeros(2, bool), 2.5, 3.5).tolist() == [
        "medium",
        "low",
    ]


def test_explanation_quality_summarises_each_level():
    emb, index, text, banks = _hierarchy()
    banks = dict(banks)
    banks["slide"] = AttributeBank(
        "slide", ["s0", "s1", "s2", "s01"], [["x"]] * 4, groups=["g", "g", "g", "g"]
    )
    df = explain_levels(emb, index, text, banks, k=2)
    quality = explanation_quality(df)
    assert list(quality) == list(LEVELS)
    for lv, q in quality.items():
        firsts = df[(df["level"] == lv) & (df["rank"] == 1)]
        assert q["entities"] == len(firsts)
        assert q["top_z_mean"] == pytest.approx(firsts["top_z"].mean())
        assert q["trust_high"] + q["trust_medium"] + q["trust_low"] == pytest.approx(1.0)
    # every slide's top two attributes share the one group: all contradict, none is trusted
    assert quality["slide"]["contradiction_rate"] == 1.0
    assert quality["slide"]["trust_low"] == 1.0
    assert quality["patch"]["contradiction_rate"] == 0.0


# ---------------------------------------------------------------------------------------------
# readouts


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _centered_reference(emb, bank, reference=None):
    """The centered readout written out directly: cosine of (e - mean e) and (t - mean t)."""
    ref = _unit(emb if reference is None else reference)
    u = _unit(_unit(emb) - ref.mean(0))
    t = _unit(bank)
    w = _unit(t - t.mean(0))
    return u @ w.T


def _zscore_reference(emb, bank, reference=None):
    """Each attribute's cosine standardised over the evaluated set (population SD)."""
    ref = _unit(emb if reference is None else reference)
    t = _unit(bank)
    over_set = ref @ t.T
    return (_unit(emb) @ t.T - over_set.mean(0)) / over_set.std(0)


def _z_of(sims):
    return (sims.max(1) - sims.mean(1)) / sims.std(1)


@pytest.mark.parametrize(
    ("readout", "formula"), [("centered", _centered_reference), ("zscore", _zscore_reference)]
)
def test_readouts_against_their_formulas(readout, formula):
    rng = np.random.default_rng(1)
    emb, bank = rng.normal(size=(11, 6)), rng.normal(size=(9, 6))
    names = [str(i) for i in range(9)]
    sims = formula(emb, bank)
    idx, scores, z = top_attributes(
        emb, 4 * bank, names, k=9, chunk_size=4, return_z=True, readout=readout
    )
    assert idx.tolist() == np.argsort(-sims, axis=1, kind="stable").tolist()
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z, _z_of(sims), rtol=1e-4)
    # an explicit reference set: its mean (and spread) is removed, not the explained rows'
    reference = rng.normal(size=(30, 6)) + 2.0
    sims = formula(emb[:3], bank, reference)
    _, scores, z = top_attributes(
        emb[:3], bank, names, k=9, return_z=True, readout=readout, reference=reference
    )
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z, _z_of(sims), rtol=1e-4)


def test_raw_readout_is_the_plain_cosine():
    rng = np.random.default_rng(2)
    emb, bank = rng.normal(size=(5, 4)), rng.normal(size=(6, 4))
    names = list("abcdef")
    plain = top_attributes(emb, bank, names, k=3, return_z=True)
    raw = top_attributes(emb, bank, names, k=3, return_z=True, readout="raw")
    for a, b in zip(plain, raw, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(raw[1][:, 0], (_unit(emb) @ _unit(bank).T).max(1), rtol=1e-5)


def _shared_component_case():
    """A bank whose attributes share a big common direction ``g``; attribute 0 ("cohesive") also
    leans on the image set's common direction ``h``, and attribute 1 ("discohesive") is its
    exclusive alternative. Entity ``j`` carries ``h`` (every entity does), its planted
    attribute ``p = 1 + j % 7``, a weaker second one ``q = 2 + p % 6`` and a little noise."""
    rng = np.random.default_rng(3)
    d, a = 16, 8
    eye = np.eye(d)
    g, h = eye[8], eye[9]
    bank = np.stack([4 * g + eye[i] + (2.0 * h if i == 0 else 0) for i in range(a)])
    planted = 1 + np.arange(21) % 7
    second = 2 + planted % 6
    emb = np.stack(
        [3 * h + 0.6 * eye[p] + 0.3 * eye[q] for p, q in zip(planted, second, strict=True)]
    )
    emb = emb + 0.02 * rng.normal(size=(21, d))
    names = ["cohesive", "discohesive"] + [f"a{i}" for i in range(2, a)]
    groups = ["cohesion", "cohesion"] + [None] * (a - 2)
    return emb, bank, names, groups, planted, second


def test_centered_readout_removes_a_shared_component():
    emb, bank, names, groups, planted, second = _shared_component_case()
    idx_raw, _, z_raw = top_attributes(emb, bank, names, k=2, return_z=True)
    idx_c, _, z_c = top_attributes(emb, bank, names, k=2, return_z=True, readout="centered")
    # raw: the shared direction wins -- every entity gets attribute 0 first, whatever it carries
    assert (idx_raw[:, 0] == 0).all()
    assert contradictions(idx_raw, groups)[planted == 1].all()  # "cohesive" next to "discohesive"
    # centered: every entity's planted attributes come first, and stand out further
    assert idx_c[:, 0].tolist() == planted.tolist() and idx_c[:, 1].tolist() == second.tolist()
    assert not contradictions(idx_c, groups).any()
    # top_z alone cannot tell: one attribute standing out alone (the shared direction) gives raw
    # the largest z there is, sqrt(A - 1), although the ranking says nothing about the entity
    np.testing.assert_allclose(z_raw, np.sqrt(len(names) - 1), rtol=0.02)
    assert (z_c < z_raw).all()
    # explanation_quality shows the difference too: raw gives one top attribute to the whole set
    index = pd.DataFrame(
        {
            "patient": [f"P{j}" for j in range(21)],
            "slide": ["1"] * 21,
            "path": [f"p{j}.tif" for j in range(21)],
        }
    )
    bank_obj = AttributeBank("patch", names, [["x"]] * len(names), groups=groups)
    text = {"patch": torch.from_numpy(bank).float()}
    raw = explanation_quality(explain_levels(emb, index, text, {"patch": bank_obj}, k=2))
    centered = explanation_quality(
        explain_levels(emb, index, text, {"patch": bank_obj}, k=2, readout="centered")
    )
    assert raw["patch"]["top1_share"] == 1.0
    assert centered["patch"]["top1_share"] == pytest.approx(3 / 21)
    assert centered["patch"]["contradiction_rate"] < raw["patch"]["contradiction_rate"]


def test_explain_levels_centres_each_level_on_its_own_entities():
    emb, index, text, banks = _hierarchy()
    emb = emb + np.array([0.3, 0.1, 0.2], np.float32)  # keep the patient means apart from 0
    emb = np.concatenate([emb, emb[:2] * [[1, 2, 1]]])  # two more patches for patient P2
    index = pd.concat([index, index.iloc[4:6]], ignore_index=True)
    index.loc[6:, "path"] = ["studies/p6.tif", "studies/p7.tif"]
    df = explain_levels(emb, index, text, banks, k=4, patches=3, readout="centered")
    # patch level: centred on every patch, also those not shown (patches=3)
    patch = df[df["level"] == "patch"]
    ref = _centered_reference(emb[:3], text["patch"].numpy(), reference=emb)
    assert len(patch) == 3 * 3
    np.testing.assert_allclose(
        patch["score"].to_numpy().reshape(3, 3), -np.sort(-ref, axis=1), atol=1e-5
    )
    # slide level: centred on the slide means (P1/1, P1/2, P2/1)
    slides = [_unit(emb[rows].astype(np.float64)).sum(0) for rows in ([0, 1, 2], [3], [4, 5, 6, 7])]
    ref = _centered_reference(np.stack(slides), text["slide"].numpy())
    got = df[df["level"] == "slide"]
    np.testing.assert_allclose(
        got["score"].to_numpy().reshape(3, 4), -np.sort(-ref, axis=1), atol=1e-5
    )
    names = np.array(banks["slide"].names)[np.argsort(-ref, axis=1, kind="stable")]
    assert got["attribute"].tolist() == names.reshape(-1).tolist()
    # a lone entity has nothing that distinguishes it: all scores 0, z 0, trust low
    lone = explain_levels(emb, index.assign(patient="P1"), text, banks, k=2, readout="centered")
    patient = lone[lone["level"] == "patient"]
    assert (patient["score"] == 0).all() and (patient["top_z"] == 0).all()
    assert (patient["trust"] == "low").all()


def test_unknown_readout_is_refused_naming_the_key():
    emb, index, text, banks = _hierarchy()
    with pytest.raises(HLSSError, match=r"^explain.readout: unknown readout 'mean'"):
        explain_levels(emb, index, text, banks, readout="mean")
    with pytest.raises(HLSSError, match=r"explain\.readout"):
        top_attributes(emb, text["patch"], ["a", "b", "c"], readout="Centered")


def test_readout_config_key(capsys):
    """``explain.readout`` is typed: Hydra refuses an unknown value when it composes (one line
    naming the key, exit status 2), and the default is the readout the docstring recommends."""
    import sys

    from hlss.cli import eval as eval_cli
    from hlss.schemas.eval import ExplainConfig, Readout

    assert [r.value for r in Readout] == list(READOUTS)
    assert ExplainConfig().readout is Readout.centered
    argv = sys.argv
    sys.argv = ["hlss-eval", "ckpt=/no/such/run", "explain.readout=bogus"]
    try:
        with pytest.raises(SystemExit) as exc:
            eval_cli.main()
    finally:
        sys.argv = argv
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: explain.readout")
    assert "bogus" in err[0] and "centered" in err[0]


# ---------------------------------------------------------------------------------------------
# trust calibrated against a null of random directions


def _null_reference(w, draws=NULL_DRAWS, seed=NULL_SEED):
    """The null written out: top_z of isotropic Gaussian directions scored against ``w``."""
    g = np.random.default_rng(seed).standard_normal((draws, w.shape[1]))
    return _z_of(g @ w.T)


def _bank_w_reference(readout, bank, reference):
    """The transformed bank of each readout, written out directly."""
    t = _unit(bank)
    if readout == "raw":
        return t
    if readout == "centered":
        return _unit(t - t.mean(0))
    return t / (_unit(reference) @ t.T).std(0)[:, None]


@pytest.mark.parametrize("readout", READOUTS)
def test_null_quantiles_against_numpy(readout):
    rng = np.random.default_rng(4)
    bank, reference = rng.normal(size=(9, 6)), rng.normal(size=(25, 6)) + 1.0
    w = _bank_w_reference(readout, bank, reference)
    expected = _null_reference(w)
    q_medium, q_high = np.quantile(expected, [0.95, 0.99])
    assert TRUST_QUANTILES == {"medium": 0.95, "high": 0.99}
    bank_w = readout_parts(reference, bank, readout)[0]
    np.testing.assert_allclose(null_top_z(bank_w), expected, rtol=1e-5)
    null = calibrate_trust(bank_w)
    assert len(null.top_z) == NULL_DRAWS and np.all(np.diff(null.top_z) >= 0)
    assert null.z_medium == pytest.approx(q_medium, rel=1e-5)
    assert null.z_high == pytest.approx(q_high, rel=1e-5)
    # top_p: the fraction of null draws at least as large
    z = np.array([0.0, q_medium, q_high, expected.max() + 1, np.median(expected)])
    want = [(expected >= v - 1e-9).mean() for v in z]
    np.testing.assert_allclose(null.p_values(z), want, atol=2 / NULL_DRAWS)
    # deterministic; another seed gives other draws but nearly the same quantiles
    assert np.array_equal(calibrate_trust(bank_w).top_z, null.top_z)
    other = calibrate_trust(bank_w, seed=1)
    assert not np.array_equal(other.top_z, null.top_z)
    assert other.z_medium == pytest.approx(null.z_medium, abs=0.15)


def test_p_values_count_draws_at_least_as_large():
    null = TrustNull(top_z=np.array([0.0, 1.0, 2.0, 3.0]), z_medium=2.85, z_high=2.97)
    assert null.p_values(np.array([1.0, 1.5, 4.0, -1.0, 3.0])).tolist() == [0.75, 0.5, 0, 1, 0.25]
    with pytest.raises(ValueError, match="draws must be"):
        null_top_z(np.eye(3), draws=0)


def test_explain_levels_reports_the_thresholds_of_each_level():
    emb, index, text, banks = _hierarchy()
    df = explain_levels(emb, index, text, banks, k=2, readout="centered")
    quality = explanation_quality(df)
    for lv in LEVELS:
        w = _bank_w_reference("centered", text[lv].numpy(), None)
        q_medium, q_high = np.quantile(_null_reference(w), [0.95, 0.99])
        assert quality[lv]["z_medium"] == pytest.approx(q_medium, rel=1e-5)
        assert quality[lv]["z_high"] == pytest.approx(q_high, rel=1e-5)
        firsts = df[(df["level"] == lv) & (df["rank"] == 1)]
        assert quality[lv]["top_p_mean"] == pytest.approx(firsts["top_p"].mean())
        assert firsts["top_p"].between(0, 1).all()
        # the labels follow the reported thresholds
        expected = trust_labels(firsts["top_z"], firsts["contradiction"], q_medium, q_high)
        assert firsts["trust"].tolist() == expected.tolist()
    # a table read back without its attrs still summarises, without thresholds
    bare = pd.DataFrame(df.to_dict("list"))
    assert "z_high" not in explanation_quality(bare)["patch"]
    given = explanation_quality(bare, thresholds=df.attrs["trust_thresholds"])
    for lv in LEVELS:
        assert given[lv]["z_high"] == quality[lv]["z_high"]
        assert given[lv]["z_medium"] == quality[lv]["z_medium"]
    with pytest.raises(ValueError, match="null_draws"):
        explain_levels(emb, index, text, banks, null_draws=0)


def _random_set(n=2000, d=64, a=32, seed=7):
    """``n`` random patch directions, a random bank of ``a`` attributes without groups."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    bank = rng.normal(size=(a, d)).astype(np.float32)
    index = pd.DataFrame(
        {
            "patient": [f"P{j % 50}" for j in range(n)],
            "slide": "1",
            "path": [f"p{j}" for j in range(n)],
        }
    )
    names = [f"a{i}" for i in range(a)]
    return emb, bank, index, names


@pytest.mark.parametrize("readout", READOUTS)
def test_random_directions_are_rarely_trusted(readout):
    emb, bank, index, names = _random_set()
    banks = {"patch": AttributeBank("patch", names, [["x"]] * len(names))}
    df = explain_levels(emb, index, {"patch": bank}, banks, k=3, readout=readout)
    firsts = df[df["rank"] == 1]
    assert not firsts["contradiction"].any()
    n = len(firsts)
    trusted = firsts["trust"].isin(["medium", "high"]).mean()
    high = (firsts["trust"] == "high").mean()
    # binomial bounds (4 sd), widened for the null's own sampling error (NULL_DRAWS draws)
    var = 1 / n + 1 / NULL_DRAWS
    assert abs(trusted - 0.05) <= 4 * np.sqrt(0.05 * 0.95 * var), trusted
    assert abs(high - 0.01) <= 4 * np.sqrt(0.01 * 0.99 * var), high
    # under the null the p-values are about uniform
    assert firsts["top_p"].mean() == pytest.approx(0.5, abs=0.03)
    assert (firsts["top_p"] <= 0.05).mean() == pytest.approx(trusted, abs=0.01)


def test_a_planted_attribute_is_trusted_unless_it_contradicts_itself():
    emb, bank, index, names = _random_set(n=400)
    planted = _unit(bank[5]) + _unit(bank[6])  # attributes 5 and 6 together
    emb = np.concatenate([emb, 0.02 * planted[None], 0.02 * _unit(bank[5])[None]])
    index = pd.concat(
        [index, pd.DataFrame({"patient": ["Q", "R"], "slide": "1", "path": ["q", "r"]})],
        ignore_index=True,
    )
    for readout in ("centered", "raw"):
        free = {"patch": AttributeBank("patch", names, [["x"]] * len(names))}
        df = explain_levels(emb, index, {"patch": bank}, free, k=2, readout=readout)
        quality = explanation_quality(df)["patch"]
        lone, pair = df[(df["path"] == "r") & (df["rank"] == 1)], df[df["path"] == "q"]
        assert lone["attribute"].item() == "a5" and lone["trust"].item() == "high"
        assert lone["top_p"].item() < 0.01 and lone["top_z"].item() > quality["z_high"]
        assert set(pair["attribute"]) == {"a5", "a6"} and (pair["trust"] == "high").all()
        # declared exclusive, the same two attributes at the top contradict: low, whatever z
        groups = [None] * 5 + ["g", "g"] + [None] * (len(names) - 7)
        exclusive = {"patch": AttributeBank("patch", names, [["x"]] * len(names), groups=groups)}
        df = explain_levels(emb, index, {"patch": bank}, exclusive, k=2, readout=readout)
        pair = df[df["path"] == "q"]
        assert pair["contradiction"].all() and (pair["trust"] == "low").all()
        assert pair["top_z"].iloc[0] > explanation_quality(df)["patch"]["z_high"]
        assert (df[df["path"] == "r"]["trust"] == "high").all()


# ---------------------------------------------------------------------------------------------
# the entity's class and how much of it the top attribute carries


def test_explain_levels_carries_each_entitys_class():
    emb, index, text, banks = _hierarchy()
    df = explain_levels(emb, index, text, banks, k=2)
    firsts = df[df["rank"] == 1]
    patch = firsts[firsts["level"] == "patch"]
    assert patch["label"].tolist() == index["label"].tolist()
    slides = firsts[firsts["level"] == "slide"]
    assert slides["label"].tolist() == ["hgg", "hgg", "lgg"]  # P1/1, P1/2, P2/1
    assert firsts[firsts["level"] == "patient"]["label"].tolist() == ["hgg", "lgg"]
    # every rank of an entity carries its label
    assert (df.groupby(["level", "patient", "slide", "path"])["label"].nunique() == 1).all()
    # mixed labels: the most common one; a tie goes to the label that sorts first
    mixed = index.assign(label=["b", "a", "b", "c", "z", "y"])
    df = explain_levels(emb, mixed, text, banks, k=1)
    assert df[df["level"] == "slide"]["label"].tolist() == ["b", "c", "y"]
    assert df[df["level"] == "patient"]["label"].tolist() == ["b", "y"]
    # a missing label is empty and does not count; no label column: empty everywhere
    gaps = index.assign(label=[None, None, "lgg", None, None, None])
    df = explain_levels(emb, gaps, text, banks, k=1)
    assert df[df["level"] == "slide"]["label"].tolist() == ["lgg", "", ""]
    assert df[df["level"] == "patch"]["label"].tolist() == ["", "", "lgg", "", "", ""]
    bare = explain_levels(emb, index.drop(columns=["label"]), text, banks, k=2)
    assert list(bare.columns) == list(COLUMNS) and (bare["label"] == "").all()


def _firsts_table(attributes, labels, level="patch"):
    """A hand-made rank-1 table with the columns explanation_quality reads."""
    n = len(attributes)
    return pd.DataFrame(
        {
            "level": level,
            "patient": [f"P{i}" for i in range(n)],
            "slide": "1",
            "path": [f"p{i}" for i in range(n)],
            "label": labels,
            "rank": 1,
            "attribute": attributes,
            "score": 0.5,
            "top_z": 1.0,
            "contradiction": False,
            "trust": "low",
            "top_p": 0.5,
        },
        columns=list(COLUMNS),
    )


def test_class_information_is_sklearns_ami_of_top_attribute_and_class():
    from sklearn.metrics import adjusted_mutual_info_score

    attributes = ["a", "a", "b", "b", "c", "a", "c", "b", "a", "c"]
    labels = ["x", "x", "x", "y", "y", "y", "z", "z", "x", "z"]
    table = _firsts_table(attributes, labels)
    expected = adjusted_mutual_info_score(labels, attributes)
    assert 0.05 < expected < 0.95  # neither extreme, so the comparison can fail
    got = explanation_quality(table)["patch"]["class_information"]
    assert got == pytest.approx(expected, abs=1e-12)
    # ranks below 1 do not count
    lower = _firsts_table(["z"] * 10, labels).assign(rank=2)
    both = pd.concat([table, lower], ignore_index=True)
    assert explanation_quality(both)["patch"]["class_information"] == pytest.approx(expected)
    # entities without a label are left out, not counted as a class of their own
    unlabelled = _firsts_table(["a", "b", "c"], ["", "", ""])
    with_gaps = pd.concat([table, unlabelled], ignore_index=True)
    assert explanation_quality(with_gaps)["patch"]["class_information"] == pytest.approx(expected)
    # a table read back from CSV (missing labels as NaN) gives the same figure
    back = pd.read_csv(io.StringIO(with_gaps.to_csv(index=False)))
    assert back["label"].isna().sum() == 3
    assert explanation_quality(back)["patch"]["class_information"] == pytest.approx(expected)


def test_class_information_planted_and_shuffled():
    rng = np.random.default_rng(11)
    n_class, per_patient, patients = 3, 4, 60
    bank = rng.normal(size=(n_class, 16)).astype(np.float32)
    names = ["attr_hgg", "attr_lgg", "attr_mening"]
    classes = np.array(["hgg", "lgg", "mening"])
    patient_class = rng.integers(0, n_class, size=patients)
    row_class = np.repeat(patient_class, per_patient)
    emb = bank[row_class] + 0.05 * rng.normal(size=(len(row_class), 16)).astype(np.float32)
    index = pd.DataFrame(
        {
            "patient": np.repeat([f"P{j:03d}" for j in range(patients)], per_patient),
            "slide": "1",
            "path": [f"p{i}.tif" for i in range(len(row_class))],
            "label": classes[row_class],
        }
    )
    banks = {lv: AttributeBank(lv, names, [["x"]] * n_class) for lv in ("patch", "patient")}
    text = {lv: bank for lv in banks}
    df = explain_levels(emb, index, text, banks, k=1)
    # planted: the top attribute names the class -> all the class information there is
    firsts = df[df["rank"] == 1]
    assert (firsts["attribute"].str.removeprefix("attr_") == firsts["label"]).all()
    quality = explanation_quality(df)
    assert quality["patch"]["class_information"] == pytest.approx(1.0)
    assert quality["patient"]["class_information"] == pytest.approx(1.0)
    # shuffled classes (whole patients, so each keeps one label): about none
    perm = rng.permutation(patients)
    shuffled = index.assign(label=classes[np.repeat(patient_class[perm], per_patient)])
    quality = explanation_quality(explain_levels(emb, shuffled, text, banks, k=1))
    assert abs(quality["patch"]["class_information"]) < 0.05
    assert abs(quality["patient"]["class_information"]) < 0.1


def test_no_labels_no_class_information():
    emb, index, text, banks = _hierarchy()
    with_labels = explanation_quality(explain_levels(emb, index, text, banks, k=2))
    assert all("class_information" in q for q in with_labels.values())
    for table in (
        explain_levels(emb, index.drop(columns=["label"]), text, banks, k=2),  # no label column
        explain_levels(emb, index.assign(label="hgg"), text, banks, k=2),  # one class
        explain_levels(emb, index.assign(label=None), text, banks, k=2),  # no label values
    ):
        quality = explanation_quality(table)
        assert set(quality) == set(LEVELS)
        assert not any("class_information" in q for q in quality.values())
    # a table written before the label column existed still summarises and prints
    old = explain_levels(emb, index, text, banks, k=2).drop(columns=["label"])
    assert "class_information" not in explanation_quality(old)["patch"]
    assert len(format_examples(old, n_per_level=1).splitlines()) == 3
