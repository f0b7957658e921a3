"""Attribute banks: named visual attributes per hierarchy level, each with sentence descriptions.

A bank is a YAML file::

    level: patch                 # patch | slide | patient
    attributes:
      - name: high cellularity
        group: cellularity       # optional: attributes of one group exclude one another
        descriptions:
          - "densely packed tumour cells fill the field"
          - "..."

The packaged banks, 128 attributes per level for each modality the toolkit reads, are
``hlss/models/attributes/<modality>_<level>.yaml`` (``srh_patch``, ..., ``he_patient``) and are
loaded by bare name: ``load_bank("srh_patch")``. Anything else is a path to the user's own file.
Attributes come most broadly useful first, so ``size=N`` keeps a sensible core.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from hlss.errors import ConfigError
from hlss.levels import LEVELS
from hlss.models.packaged import load_packaged_or_file, packaged_names


@dataclass
class AttributeBank:
    """The attributes of one level.

    Attributes:
        level: ``"patch"``, ``"slide"`` or ``"patient"``.
        names: ``A`` attribute names (unique).
        descriptions: ``A`` non-empty lists of sentences, ``descriptions[j]`` describes ``names[j]``.
        source: the file the bank was read from.
        groups: ``A`` group names or ``None`` (no group). Attributes that share a group are
            mutually exclusive alternatives (e.g. high / moderate / low cellularity); explanations
            use this to count self-contradicting rankings. ``None`` for the whole bank: no groups.
    """

    level: str
    names: list[str]
    descriptions: list[list[str]]
    source: str = field(default="", compare=False)
    groups: list[str | None] | None = None

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = [None] * len(self.names)
        if len(self.groups) != len(self.names):
            raise ConfigError(
                f"{self.source or 'attribute bank'}: {len(self.groups)} groups for "
                f"{len(self.names)} attributes"
            )

    def __len__(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        """Number of attributes ``A``."""
        return len(self.names)


MODALITIES = ("srh", "he")


def packaged_bank_names() -> list[str]:
    """Names of the banks shipped with the package (``"he_patch"``, ..., ``"srh_slide"``)."""
    return packaged_names("attributes")


def packaged_bank_name(modality: str, level: str) -> str:
    """The packaged bank of ``level`` for images of ``modality`` (``"srh"`` or ``"he"``).

    Raises:
        ConfigError: an unknown modality or level.
    """
    if modality not in MODALITIES:
        raise ConfigError(
            f"attributes.modality: {modality!r} has no packaged banks "
            f"(packaged: {', '.join(MODALITIES)}; or give your own bank files)"
        )
    if level not in LEVELS:
        raise ConfigError(f"attributes: unknown level {level!r} (levels: {', '.join(LEVELS)})")
    return f"{modality}_{level}"


def load_bank(
    path_or_name: str, level: str | None = None, size: int | None = None
) -> AttributeBank:
    """Load and validate an attribute bank.

    Args:
        path_or_name: a packaged bank name (``"srh_patch"``, ..., ``"he_patient"``) or a YAML path.
        level: the level the caller expects; ``None`` accepts the file's level. A file without a
            ``level`` key takes this one.
        size: keep only the first ``size`` attributes.

    Returns:
        The :class:`AttributeBank`.

    Raises:
        ConfigError: (one line naming the file) missing file, malformed YAML, not a mapping, no
            attributes, an attribute without a name or without descriptions, a non-string
            description, a group that is not text, duplicate names, an unknown or unexpected
            level, or ``size`` larger than the bank / smaller than 1.
    """
    where, doc = load_packaged_or_file(path_or_name, "attributes", "attribute bank")
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys 'level' and 'attributes'")

    file_level = doc.get("level", level)
    if file_level is None:
        raise ConfigError(f"{where}: missing key 'level' (one of {', '.join(LEVELS)})")
    if file_level not in LEVELS:
        raise ConfigError(f"{where}: level {file_level!r} is not one of {', '.join(LEVELS)}")
    if level is not None and file_level != level:
        raise ConfigError(f"{where}: bank is for level {file_level!r}, expected {level!r}")

    attrs = doc.get("attributes")
    if not isinstance(attrs, list) or not attrs:
        raise ConfigError(f"{where}: 'attributes' must be a non-empty list")
    names: list[str] = []
    descriptions: list[list[str]] = []
    groups: list[str | None] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(attrs):
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"{where}: attributes[{i}] must be a mapping with 'name' and 'descriptions'"
            )
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: attributes[{i}] has no name")
        name = name.strip()
        descs = item.get("descriptions")
        if not isinstance(descs, list) or not descs:
            raise ConfigError(f"{where}: attribute {name!r} has no descriptions")
        for d in descs:
            if not isinstance(d, str) or not d.strip():
                raise ConfigError(
                    f"{where}: attribute {name!r} has an empty or non-text description"
                )
        key = name.casefold()
        if key in seen:
            raise ConfigError(
                f"{where}: duplicate attribute name {name!r} (attributes[{seen[key]}] and [{i}])"
            )
        group = item.get("group")
        if group is not None and (not isinstance(group, str) or not group.strip()):
            raise ConfigError(f"{where}: attribute {name!r} has a group that is not text")
        seen[key] = i
        names.append(name)
        descriptions.append([d.strip() for d in descs])
        groups.append(group.strip() if group is not None else None)

    if size is not None:
        size = int(size)
        if size < 1:
            raise ConfigError(f"{where}: requested bank size {size} must be >= 1")
        if size > len(names):
            raise ConfigError(f"{where}: requested {size} attributes but the bank has {len(names)}")
        names, descriptions, groups = names[:size], descriptions[:size], groups[:size]
    return AttributeBank(
        level=file_level, names=names, descriptions=descriptions, source=where, groups=groups
    )


def load_banks(
    banks: Mapping[str, str] | None = None,
    sizes: Mapping[str, int | None] | None = None,
    modality: str = "srh",
) -> dict[str, AttributeBank]:
    """Load one bank per level.

    Args:
        banks: ``{level: packaged name or path}``; ``None`` -> the packaged bank of every level
            for ``modality``.
        sizes: optional ``{level: size}`` truncations.
        modality: the images' modality, ``"srh"`` or ``"he"`` (only used when ``banks`` is None).

    Returns:
        ``{level: AttributeBank}`` in :data:`LEVELS` order.

    Raises:
        ConfigError: an unknown level key, or any :func:`load_bank` problem.
    """
    if banks is None:
        banks = {lv: packaged_bank_name(modality, lv) for lv in LEVELS}
    banks = dict(banks)
    sizes = dict(sizes or {})
    for key in (*banks, *sizes):
        if key not in LEVELS:
            raise ConfigError(f"banks: unknown level {key!r} (levels: {', '.join(LEVELS)})")
    return {lv: load_bank(banks[lv], level=lv, size=sizes.get(lv)) for lv in LEVELS if lv in banks}


def attribute_banks(
    patch: str | None = "packaged",
    slide: str | None = "packaged",
    patient: str | None = "packaged",
    size: int | None = None,
    modality: str = "srh",
) -> dict[str, AttributeBank]:
    """The ``attributes`` config node: one bank per level, by packaged name or YAML path.

    Args:
        patch, slide, patient: ``"packaged"`` (the bank shipped for ``modality`` and that level),
            a packaged bank name (``"he_patch"``) or the path of a bank file; ``None`` leaves the
            level without a bank (no head, no language term there).
        size: keep only the first ``size`` attributes of every bank (``None``: all).
        modality: the dataset's modality (``"srh"`` or ``"he"``; the ``dataset.modality`` key),
            which picks the packaged banks.

    Returns:
        ``{level: AttributeBank}`` for the levels given, finest first.

    Raises:
        ConfigError: a missing or malformed bank file, a bank of another level, or a size the
            bank cannot give.
    """
    names = {"patch": patch, "slide": slide, "patient": patient}
    chosen = {
        lv: packaged_bank_name(modality, lv) if name == "packaged" else str(name)
        for lv, name in names.items()
        if name is not None
    }
    return load_banks(chosen, dict.fromkeys(chosen, size))


def embed_banks(
    encoder, banks: Mapping[str, AttributeBank], cache_dir: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Embed every bank with ``encoder`` (prompt ensemble, cached): ``{level: [A_l, dim]}``."""
    from hlss.models.text import embed_prompts

    return {lv: embed_prompts(encoder, bank.descriptions, cache_dir) for lv, bank in banks.items()}
