"""Checks on what an attribute bank says: descriptions that a text encoder cannot tell apart.

A bank whose attributes are paraphrases of one another gives text-initialised heads that start
nearly collinear and explanations that rank look-alikes side by side. These checks measure that
in the embedding space of the encoder that builds the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hlss.models.attributes import AttributeBank

#: Cosine at or above which two descriptions of different attributes count as near-duplicates
#: (all-MiniLM-L6-v2: descriptions of unrelated attributes in a pathology bank sit near 0.3,
#: close paraphrases above 0.9).
NEAR_DUPLICATE_COSINE = 0.9


@dataclass(frozen=True)
class NearDuplicate:
    """Two descriptions (or two attributes) of one bank that the encoder barely separates.

    Attributes:
        cosine: their cosine similarity in the encoder's space.
        kind: ``"description"`` (two sentences of different attributes) or ``"attribute"`` (two
            attributes' mean embeddings).
        first, second: ``(attribute name, sentence)``; the sentence is ``""`` for ``"attribute"``.
    """

    cosine: float
    kind: str
    first: tuple[str, str]
    second: tuple[str, str]

    def __str__(self) -> str:
        if self.kind == "attribute":
            return f"{self.cosine:.3f} attributes {self.first[0]!r} and {self.second[0]!r}"
        return (
            f"{self.cosine:.3f} {self.first[0]!r}: {self.first[1]!r} ~ "
            f"{self.second[0]!r}: {self.second[1]!r}"
        )


def near_duplicates(
    bank: AttributeBank, encoder, threshold: float = NEAR_DUPLICATE_COSINE
) -> list[NearDuplicate]:
    """Pairs of the bank that ``encoder`` places at cosine >= ``threshold``, most similar first.

    Two checks: every pair of descriptions that belong to *different* attributes, and every pair
    of attributes by the normalised mean of their descriptions (what a head row starts from).

    Args:
        bank: the bank to check.
        encoder: a text encoder with ``encode(list[str]) -> Tensor [n, dim]``.
        threshold: cosine in ``(-1, 1]``.

    Returns:
        The flagged pairs, highest cosine first (empty when the bank is clean).

    Raises:
        ValueError: ``threshold`` outside ``(-1, 1]``.
    """
    if not -1.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (-1, 1], got {threshold}")
    owners = [j for j, descs in enumerate(bank.descriptions) for _ in descs]
    sentences = [d for descs in bank.descriptions for d in descs]
    emb = torch.nn.functional.normalize(encoder.encode(sentences).float(), dim=-1)
    owner = torch.tensor(owners)
    found: list[NearDuplicate] = []

    sim = emb @ emb.T
    other = owner[:, None] != owner[None, :]
    upper = torch.triu(torch.ones_like(sim, dtype=torch.bool), diagonal=1)
    for a, b in (other & upper & (sim >= threshold)).nonzero().tolist():
        found.append(
            NearDuplicate(
                float(sim[a, b]),
                "description",
                (bank.names[owners[a]], sentences[a]),
                (bank.names[owners[b]], sentences[b]),
            )
        )

    means = torch.zeros(len(bank.names), emb.shape[1]).index_add_(0, owner, emb)
    means = torch.nn.functional.normalize(means, dim=-1)
    msim = means @ means.T
    for a, b in torch.triu(msim >= threshold, diagonal=1).nonzero().tolist():
        found.append(
            NearDuplicate(float(msim[a, b]), "attribute", (bank.names[a], ""), (bank.names[b], ""))
        )
    return sorted(found, key=lambda d: -d.cosine)
