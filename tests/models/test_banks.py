"""The packaged attribute banks: the paper's size, groups, the modality picks them, and no two
attributes that the default text encoder cannot tell apart."""

from __future__ import annotations

import pytest
import yaml

from hlss.errors import ConfigError
from hlss.levels import LEVELS
from hlss.models.attributes import (
    MODALITIES,
    AttributeBank,
    attribute_banks,
    load_bank,
    packaged_bank_names,
)
from hlss.models.bank_quality import NEAR_DUPLICATE_COSINE, near_duplicates
from hlss.models.text import MiniLMTextEncoder, TinyTextEncoder
from tests.test_configs import train_cfg

PACKAGED = [f"{m}_{lv}" for m in MODALITIES for lv in LEVELS]


def test_one_packaged_bank_per_modality_and_level():
    assert sorted(packaged_bank_names()) == sorted(PACKAGED)


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_bank_has_the_published_size(name):
    bank = load_bank(name)
    assert bank.level == name.split("_", 1)[1]
    assert len(bank) == 128  # the published setting: 128 attributes per level
    assert all(len(d) >= 3 for d in bank.descriptions)  # several descriptions each
    assert len({n.casefold() for n in bank.names}) == 128
    # every attribute belongs to a group of mutually exclusive alternatives (possibly alone)
    assert all(isinstance(g, str) and g for g in bank.groups)
    assert len(set(bank.groups)) >= 20
    sentences = [d for descs in bank.descriptions for d in descs]
    assert len(set(sentences)) == len(sentences)


@pytest.mark.parametrize("modality", MODALITIES)
def test_the_dataset_modality_picks_the_bank(modality, tmp_path):
    banks = attribute_banks(modality=modality, size=7)
    assert [b.source for b in banks.values()] == [
        f"hlss/models/attributes/{modality}_{lv}.yaml" for lv in LEVELS
    ]
    assert {len(b) for b in banks.values()} == {7}
    assert banks["patch"].names == load_bank(f"{modality}_patch").names[:7]


@pytest.mark.parametrize(
    "overrides,modality",
    [
        (["dataset=synthetic"], "srh"),
        (["dataset=opensrh", "dataset.root=/x"], "srh"),
        (["dataset=tcga", "dataset.root=/x"], "he"),
    ],
)
def test_train_config_follows_the_dataset_modality(overrides, modality, tmp_path):
    cfg = train_cfg(tmp_path, *overrides, resolve=True)
    assert cfg.attributes.modality == modality
    from hlss.config import build

    banks = build(cfg.attributes)
    assert banks["slide"].source.endswith(f"{modality}_slide.yaml")


def test_own_bank_file_beside_packaged_ones(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "level": "slide",
                "attributes": [
                    {"name": "a", "group": "g", "descriptions": ["x"]},
                    {"name": "b", "descriptions": ["y"]},
                ],
            }
        )
    )
    banks = attribute_banks(slide=str(path), patient=None, modality="he")
    assert list(banks) == ["patch", "slide"]
    assert banks["slide"].groups == ["g", None]
    assert banks["patch"].source.endswith("he_patch.yaml")


def test_bad_modality_and_bad_group_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"attributes\.modality: 'ihc' has no packaged banks"):
        attribute_banks(modality="ihc")
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {"level": "patch", "attributes": [{"name": "a", "group": 3, "descriptions": ["x"]}]}
        )
    )
    with pytest.raises(ConfigError, match="'a' has a group that is not text"):
        load_bank(str(path))


def _bank(*attrs: tuple[str, list[str]]) -> AttributeBank:
    return AttributeBank("patch", [a for a, _ in attrs], [d for _, d in attrs])


def test_near_duplicates_flags_paraphrases_across_attributes_only():
    bank = _bank(
        ("large nuclei", ["the nuclei are large and round", "big round nuclei fill the cells"]),
        ("big nuclei", ["the nuclei are large and round", "calcified debris"]),
        ("collagen", ["wavy bundles of collagen fibres"]),
    )
    found = near_duplicates(bank, TinyTextEncoder(dim=64))
    pairs = {(d.kind, d.first[0], d.second[0]) for d in found}
    # the identical sentence of two attributes is flagged; nothing within one attribute is
    assert ("description", "large nuclei", "big nuclei") in pairs
    assert all(d.first[0] != d.second[0] for d in found)
    assert all(d.cosine >= NEAR_DUPLICATE_COSINE for d in found)
    assert [d.cosine for d in found] == sorted((d.cosine for d in found), reverse=True)
    assert "collagen" not in {name for _, a, b in pairs for name in (a, b)}


def test_near_duplicates_compares_attribute_means():
    bank = _bank(("a", ["alpha one", "beta two"]), ("b", ["alpha one", "beta two"]))
    found = near_duplicates(bank, TinyTextEncoder(dim=64), threshold=0.99)
    assert ("attribute", "a", "b") in {(d.kind, d.first[0], d.second[0]) for d in found}
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(bank, TinyTextEncoder(dim=8), threshold=1.5)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_bank_has_no_near_duplicates(name, minilm):
    """Descriptions of different attributes are not paraphrases in the default encoder's space."""
    found = near_duplicates(load_bank(name), minilm)
    assert not found, "\n".join(str(d) for d in found[:10])
