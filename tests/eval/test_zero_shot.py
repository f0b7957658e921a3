"""Class prompt files and zero-shot class probabilities (hand-made vectors, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlss import CLASSES_OPENSRH
from hlss.errors import ConfigError, HLSSError
from hlss.eval.zero_shot import load_class_prompts, packaged_prompt_names, zero_shot_scores
from hlss.models.text import TinyTextEncoder, embed_prompts

# ---------------------------------------------------------------------------------------------
# load_class_prompts


def _write(tmp_path, text: str, name: str = "prompts.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_class_prompts_ok(tmp_path):
    path = _write(
        tmp_path,
        "b:\n  - ' second class, first text '\n  - another\na: [only one]\nc: a single string\n",
    )
    prompts = load_class_prompts(str(path), ["a", "b", "c"])
    assert prompts == [["only one"], ["second class, first text", "another"], ["a single string"]]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a: [x]\n", "class 'b' has no descriptions"),
        ("a: [x]\nb: []\n", "class 'b' needs a non-empty list"),
        ("a: [x]\nb: ['  ']\n", "class 'b' has an empty or non-text description"),
        ("a: [x]\nb: [3]\n", "class 'b' has an empty or non-text description"),
        ("a: [x]\nb: {k: v}\n", "class 'b' needs a non-empty list"),
        ("a: [x]\nb: [y]\nzzz: [z]\n", "unknown class 'zzz'"),
        ("a: [x\nb: [y]\n", "malformed YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("", "expected a mapping"),
    ],
)
def test_load_class_prompts_errors(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_class_prompts(str(path), ["a", "b"])
    msg = str(err.value)
    assert needle in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_load_class_prompts_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as err:
        load_class_prompts(str(missing), ["a"])
    assert str(missing) in str(err.value)
    with pytest.raises(ConfigError, match="none packaged by that name") as err:
        load_class_prompts("no_such_prompts", ["a"])
    assert "opensrh_classes" in str(err.value)


def test_packaged_opensrh_prompts_cover_classes(tmp_path):
    assert "opensrh_classes" in packaged_prompt_names()
    prompts = load_class_prompts("opensrh_classes", CLASSES_OPENSRH)
    assert len(prompts) == len(CLASSES_OPENSRH) == 7
    for cls, descs in zip(CLASSES_OPENSRH, prompts, strict=True):
        assert 4 <= len(descs) <= 6, cls
        assert len(set(descs)) == len(descs), cls
    flat = [d for descs in prompts for d in descs]
    assert len(set(flat)) == len(flat)
    # a subset of the classes is an error: the file names classes the caller did not ask for
    with pytest.raises(ConfigError, match="unknown class"):
        load_class_prompts("opensrh_classes", CLASSES_OPENSRH[:3])
    # the prompts embed as a prompt ensemble: one row per class
    emb = embed_prompts(TinyTextEncoder(dim=32), prompts, tmp_path / "cache")
    assert emb.shape == (7, 32)


class _TokenList(list):
    """What open_clip's builder gets from the tokenizer: it only calls ``.to(device)``."""

    def to(self, device):
        return self


class _EncodeTextAdapter:
    """A text encoder seen through open_clip's model interface (``encode_text``)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def encode_text(self, texts, normalize: bool = False):
        emb = self.encoder.encode(list(texts))
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


def test_open_clip_builder_matches_embed_prompts_for_tiny_encoder(tmp_path):
    """embed_prompts' ensembling (kept for encoders without encode_text) means the same as
    open_clip's zero-shot classifier builder."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    enc = TinyTextEncoder(dim=24, seed=5)
    classnames = ["tumour", "necrosis", "normal white matter"]
    templates = ["a smear of {} cells.", "{}", "an image showing {} under the microscope"]
    weights = build_zero_shot_classifier(
        _EncodeTextAdapter(enc), _TokenList, classnames, templates, num_classes_per_batch=2
    )  # [D, C]
    prompts = [[t.format(c) for t in templates] for c in classnames]
    ours = embed_prompts(enc, prompts, tmp_path)
    assert weights.shape == (24, 3) and ours.shape == (3, 24)
    torch.testing.assert_close(ours, weights.T, rtol=1e-5, atol=1e-6)
    # and the scores built on either are the same
    x = np.random.default_rng(1).normal(size=(6, 24)).astype(np.float32)
    np.testing.assert_allclose(
        zero_shot_scores(x, ours), zero_shot_scores(x, weights.T), rtol=1e-4, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# zero_shot_scores


def _class_vectors():
    # three classes along three axes of a 4-d space
    return np.eye(3, 4, dtype=np.float32)


def test_zero_shot_picks_closest_class():
    classes = _class_vectors()
    images = np.array(
        [
            [0.9, 0.1, 0.0, 0.3],  # class 0
            [0.1, 2.0, 0.3, 0.0],  # class 1 (unnormalised)
            [0.2, 0.1, 0.7, -0.5],  # class 2
            [0.0, 0.0, 0.0, 1.0],  # orthogonal to all -> uniform
        ],
        dtype=np.float32,
    )
    probs = zero_shot_scores(images, classes)
    assert probs.shape == (4, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert probs[:3].argmax(1).tolist() == [0, 1, 2]
    np.testing.assert_allclose(probs[3], 1 / 3, rtol=1e-6)


def test_zero_shot_exact_values_and_inputs():
    classes = _class_vectors()
    x = np.array([[3.0, 4.0, 0.0, 0.0]], dtype=np.float32)  # cos = 0.6, 0.8, 0
    tau = 0.5
    logits = np.array([0.6, 0.8, 0.0]) / tau
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(
        zero_shot_scores(x, classes, temperature=tau)[0], expected, rtol=1e-5
    )
    # float16 numpy, torch tensors and tiny chunks give the same answer
    rng = np.random.default_rng(0)
    many = rng.normal(size=(50, 4)).astype(np.float32)
    ref = zero_shot_scores(many, classes, temperature=0.1)
    np.testing.assert_allclose(
        zero_shot_scores(many.astype(np.float16), classes, temperature=0.1), ref, atol=2e-3
    )
    np.testing.assert_allclose(
        zero_shot_scores(torch.from_numpy(many), torch.from_numpy(classes), 0.1), ref, rtol=1e-5
    )
    np.testing.assert_allclose(zero_shot_scores(many, classes, 0.1, chunk_size=7), ref, rtol=1e-6)
    # zero-row input
    assert zero_shot_scores(np.zeros((0, 4), np.float16), classes).shape == (0, 3)


def test_zero_shot_errors():
    classes = _class_vectors()
    with pytest.raises(HLSSError, match="width 5 but class text embeddings 4"):
        zero_shot_scores(np.ones((2, 5)), classes)
    with pytest.raises(ValueError, match="temperature"):
        zero_shot_scores(np.ones((2, 4)), classes, temperature=0)
    with pytest.raises(ValueError, match="2-D"):
        zero_shot_scores(np.ones(4), classes)


def test_auto_prompts_only_for_the_classes_they_describe():
    from hlss.eval.pipeline import class_prompt_file

    assert class_prompt_file("auto", list(reversed(CLASSES_OPENSRH))) == "opensrh_classes"
    assert class_prompt_file("auto", ["luad", "lusc"]) is None  # zero-shot is skipped
    assert class_prompt_file("auto", CLASSES_OPENSRH[:3]) is None
    assert class_prompt_file("mine.yaml", ["luad"]) == "mine.yaml"
