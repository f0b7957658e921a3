"""The dual encoder: an image backbone tied to frozen text embeddings of attribute banks.

``DualEncoder`` maps images ``[B, 3, H, W]`` to

* ``features`` ``[B, F]``: the backbone output (what kNN evaluation uses by default);
* ``text_space`` ``[B, D]``: the features projected into the text space (``D`` = text dim) and
  L2-normalised (identity projection when the backbone already lives in the text encoder's joint
  space, e.g. an open_clip visual tower with its own text tower);
* ``heads``: ``{level: [B, A_level]}`` for ``head="text"``: one bias-free linear head per level
  whose weight rows are initialised to the level's attribute text embeddings, so at step 0
  output ``j`` is the cosine similarity of the image to attribute ``j``; or one tensor
  ``[B, mlp_dim]`` for ``head="mlp"`` (the HiDisc baseline's shared projection head: one
  linear layer as published, or an MLP with ``mlp_hidden`` widths).

The frozen text embeddings are persistent buffers ``text_<level>`` (saved in checkpoints, moved
with ``.to(device)``, never trained), exposed as :attr:`DualEncoder.text_embeddings` for the
language-alignment losses.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hlss.errors import ConfigError
from hlss.levels import LEVELS
from hlss.models.attributes import AttributeBank

HEADS = ("text", "mlp")
PROJECTIONS = ("auto", "linear", "mlp", "identity")
HEAD_INITS = ("text", "orthogonal", "random")


def orthogonal_rows(emb: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal rows nearest to ``emb`` ``[A, D]`` (Frobenius norm).

    The polar factor ``U V^T`` of ``emb = U S V^T``: row ``j`` stays the direction closest to
    attribute ``j`` while the rows become mutually orthogonal, so a head built from it starts
    with full rank ``min(A, D)`` instead of the few directions that sentence embeddings of one
    bank mostly span.
    """
    u, _, vh = torch.linalg.svd(emb.double(), full_matrices=False)
    return (u @ vh).to(emb.dtype)


class DualEncoder(nn.Module):
    """Backbone + projection into the text space + per-level attribute heads.

    Args:
        backbone: module ``[B, 3, H, W]`` -> ``[B, F]`` with attributes ``num_features`` (``F``)
            and optionally ``joint_space_dim``.
        text_dim: width ``D`` of the text embeddings; ``None`` -> taken from ``banks``
            (may be ``None`` for ``head="mlp"``).
        banks: ``{level: Tensor[A_level, D]}`` frozen attribute embeddings (rows L2-normalised;
            rows that are not unit vectors are normalised), levels a non-empty subset of
            ``("patch", "slide", "patient")``; may be ``None`` for ``head="mlp"``.
        head: ``"text"`` (per-level heads initialised from the text) or ``"mlp"`` (HiDisc).
        projection: ``"auto"`` (identity when ``backbone.joint_space_dim == text_dim``, else
            ``"linear"``), ``"linear"`` (``F -> D``), ``"mlp"`` (``F -> H -> D`` with ReLU,
            ``H = proj_hidden or F``) or ``"identity"`` (needs ``F == D``).
        proj_hidden: hidden width of the ``"mlp"`` projection (0 -> ``F``).
        mlp_dim: output width of the ``head="mlp"`` head.
        mlp_hidden: hidden widths of the ``head="mlp"`` head, ReLU between layers; ``()`` (the
            default, HiDisc's published ``mlp_hidden: []``) is one linear layer ``F -> mlp_dim``.
        head_init: how the ``head="text"`` weights start: ``"text"`` (the paper: row ``j`` is
            attribute ``j``'s embedding), ``"orthogonal"`` (ours: the nearest matrix with
            orthonormal rows, :func:`orthogonal_rows`) or ``"random"`` (PyTorch's default
            initialisation; a control without language). The frozen ``text_<level>`` buffers
            that the alignment losses use are the attribute embeddings in every case.
        head_per_level: whether each level's contrastive term has a head of its own. ``None``
            (default): the papers' layouts, ``True`` for ``head="text"`` (HLSS) and ``False``
            for ``head="mlp"`` (HiDisc's one shared head). ``head="mlp"`` with ``True`` builds
            one MLP per level (the HLSS layout without text); ``head="text"`` with ``False``
            (ours) gives every level's term the concatenated outputs of all level heads: one
            tensor ``[B, sum A_level]`` in ``forward``'s ``heads`` (the form a shared head takes
            everywhere), i.e. one head whose rows are the attributes of every level, while
            :meth:`embed` of a level still returns that level's own outputs.
        center_text: subtract each level's mean attribute embedding (then renormalise) before
            storing the prototypes and initialising the heads. Sentence embeddings of one bank
            share a large common direction (mean pairwise cosine ~0.5 for MiniLM); without
            centring, every head output points mostly along it and the level's contrastive term
            starts from nearly collinear embeddings.

    Raises:
        ConfigError: unknown ``head``/``projection``; ``head="text"`` without banks; an unknown
            level; a bank that is not ``[A, D]`` with ``A >= 1``; ``text_dim`` disagreeing with
            the banks; ``"identity"`` projection with ``F != D``; a backbone without
            ``num_features``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        text_dim: int | None,
        banks: Mapping[str, torch.Tensor] | None,
        head: str = "text",
        projection: str = "auto",
        proj_hidden: int = 0,
        mlp_dim: int = 128,
        center_text: bool = False,
        mlp_hidden: Sequence[int] = (),
        head_init: str = "text",
        head_per_level: bool | None = None,
    ):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"model.head: {head!r} is not one of {', '.join(HEADS)}")
        if head_init not in HEAD_INITS:
            raise ConfigError(
                f"model.head_init: {head_init!r} is not one of {', '.join(HEAD_INITS)}"
            )
        if projection not in PROJECTIONS:
            raise ConfigError(
                f"model.projection: {projection!r} is not one of {', '.join(PROJECTIONS)}"
            )
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int) or num_features < 1:
            raise ConfigError(
                "model.backbone: the backbone has no integer attribute 'num_features'"
            )
        self.backbone = backbone
        self.num_features = num_features
        self.head_type = head
        self.head_per_level = (head == "text") if head_per_level is None else bool(head_per_level)
        self.levels: tuple[str, ...] = ()
        # {level: AttributeBank} the text heads were built from (names and descriptions; plain
        # Python, not part of the state dict), set by build_dual_encoder; None for the MLP head.
        self.attribute_banks: dict[str, AttributeBank] | None = None

        if head == "mlp":
            self.text_dim = None
            self.projection = None
            self.projection_type = None
            widths = [num_features, *(int(h) for h in mlp_hidden), int(mlp_dim)]

            def mlp() -> nn.Sequential:
                layers: list[nn.Module] = []
                for i in range(len(widths) - 1):
                    if i:
                        layers.append(nn.ReLU(inplace=True))
                    layers.append(nn.Linear(widths[i], widths[i + 1]))
                return nn.Sequential(*layers)

            self.mlp_dim = int(mlp_dim)
            if self.head_per_level:
                self.head = None
                self.heads = nn.ModuleDict({lv: mlp() for lv in LEVELS})
            else:
                self.head = mlp()
                self.heads = None
            return

        # ---- head == "text"
        if not banks:
            raise ConfigError(
                "model.banks: head='text' needs at least one level of attribute embeddings"
            )
        for level in banks:
            if level not in LEVELS:
                raise ConfigError(
                    f"model.banks: unknown level {level!r} (levels: {', '.join(LEVELS)})"
                )
        levels = tuple(lv for lv in LEVELS if lv in banks)
        dims = set()
        for lv in levels:
            emb = banks[lv]
            if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] < 1:
                shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                raise ConfigError(
                    f"model.banks.{lv}: expected a tensor [A, text_dim] with A >= 1, got {shape}"
                )
            dims.add(int(emb.shape[1]))
        if len(dims) != 1:
            raise ConfigError(f"model.banks: levels disagree on the text dimension: {sorted(dims)}")
        bank_dim = dims.pop()
        if text_dim is None:
            text_dim = bank_dim
        elif int(text_dim) != bank_dim:
            raise ConfigError(
                f"model.text_dim: {text_dim} but the bank embeddings have dimension {bank_dim}"
            )
        text_dim = int(text_dim)
        self.text_dim = text_dim
        self.levels = levels

        joint = getattr(backbone, "joint_space_dim", None)
        if projection == "auto":
            projection = "identity" if joint is not None and int(joint) == text_dim else "linear"
        if projection == "identity":
            if num_features != text_dim:
                raise ConfigError(
                    f"model.projection: 'identity' needs backbone features ({num_features}) "
                    f"== text_dim ({text_dim}); use 'linear' or 'mlp'"
                )
            self.projection = nn.Identity()
        elif projection == "linear":
            self.projection = nn.Linear(num_features, text_dim)
        else:  # mlp
            hidden = int(proj_hidden) or num_features
            self.projection = nn.Sequential(
                nn.Linear(num_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, text_dim)
            )
        self.projection_type = projection

        self.heads = nn.ModuleDict()
        for lv in levels:
            emb = banks[lv].detach().float().cpu()
            if center_text and emb.shape[0] > 1:
                # remove what every description of the level shares (mean direction), so the
                # attribute similarities, and the heads built from them, are discriminative
                emb = emb - emb.mean(dim=0, keepdim=True)
            if not torch.allclose(emb.norm(dim=-1), torch.ones(emb.shape[0]), atol=1e-4):
                emb = F.normalize(emb, dim=-1)  # rows must be unit vectors (cosine heads)
            self.register_buffer(f"text_{lv}", emb.clone(), persistent=True)
            lin = nn.Linear(text_dim, emb.shape[0], bias=False)
            if head_init != "random":
                init = orthogonal_rows(emb) if head_init == "orthogonal" else emb
                with torch.no_grad():
                    lin.weight.copy_(init)
            self.heads[lv] = lin
        self.head = None
        self.head_init = head_init

    # ------------------------------------------------------------------------------------------
    @property
    def text_embeddings(self) -> dict[str, torch.Tensor]:
        """Frozen attribute embeddings ``{level: [A_level, text_dim]}`` (L2-normalised buffers)."""
        return {lv: getattr(self, f"text_{lv}") for lv in self.levels}

    @property
    def num_attributes(self) -> dict[str, int]:
        """``{level: A_level}``."""
        return {lv: int(getattr(self, f"text_{lv}").shape[0]) for lv in self.levels}

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` [B, F] -> L2-normalised ``[B, text_dim]`` (text heads only)."""
        if self.projection is None:
            raise ConfigError("model: head='mlp' has no text space")
        return F.normalize(self.projection(features), dim=-1)

    def forward(self, x: torch.Tensor) -> dict:
        """``x`` [B, 3, H, W] -> ``{"features": [B, F], "text_space": [B, D], "heads": {...}}``.

        ``heads`` is ``{level: [B, A_level]}`` for ``head="text"`` (one tensor
        ``[B, sum A_level]`` with ``head_per_level=False``); for ``head="mlp"`` it is one tensor
        ``[B, mlp_dim]`` (``{level: [B, mlp_dim]}`` with ``head_per_level=True``) and
        ``text_space`` is absent.
        """
        return self.outputs(self.backbone(x))

    def outputs(self, features: torch.Tensor) -> dict:
        """Everything after the backbone: ``features`` [B, F] -> :meth:`forward`'s dict."""
        if self.head_type == "mlp":
            if self.heads is not None:
                heads = {lv: head(features) for lv, head in self.heads.items()}
                return {"features": features, "heads": heads}
            return {"features": features, "heads": self.head(features)}
        text_space = self.project(features)
        heads = {lv: self.heads[lv](text_space) for lv in self.levels}
        if not self.head_per_level:  # one tensor: the levels share it, as HiDisc's one head
            heads = torch.cat([heads[lv] for lv in self.levels], dim=1)
        return {"features": features, "text_space": text_space, "heads": heads}

    @torch.no_grad()
    def embed(self, x: torch.Tensor, source: str = "backbone") -> torch.Tensor:
        """Embeddings for evaluation (no gradient; the caller sets eval mode).

        Args:
            x: ``[B, 3, H, W]``.
            source: ``"backbone"`` ([B, F]), ``"text_space"`` ([B, D]), ``"head"`` (mlp head,
                [B, mlp_dim]) or a level name (that level's head output, [B, A_level]).

        Raises:
            ConfigError: ``source`` is not available for this model.
        """
        features = self.backbone(x)
        if source == "backbone":
            return features
        if self.head_type == "mlp":
            if self.heads is not None:
                if source in self.heads:
                    return self.heads[source](features)
                options = ", ".join(("backbone", *self.heads))
                raise ConfigError(f"embed source {source!r}: not one of {options}")
            if source in ("head", "mlp"):
                return self.head(features)
            raise ConfigError(
                f"embed source {source!r}: a head='mlp' model offers 'backbone' or 'head'"
            )
        if source == "text_space":
            return self.project(features)
        if source in self.levels:
            return self.heads[source](self.project(features))
        options = ", ".join(("backbone", "text_space", *self.levels))
        raise ConfigError(f"embed source {source!r}: not one of {options}")


def build_dual_encoder(
    backbone: nn.Module,
    text_encoder=None,
    banks: Mapping[str, str | AttributeBank] | None = None,
    bank_sizes: Mapping[str, int | None] | None = None,
    text_cache_dir: str | None = None,
    head: str = "text",
    projection: str = "auto",
    proj_hidden: int = 0,
    mlp_dim: int = 128,
    center_text: bool = False,
    mlp_hidden: Sequence[int] = (),
    head_init: str = "text",
    head_per_level: bool | None = None,
) -> DualEncoder:
    """Load the attribute banks, embed them (cached) and build a :class:`DualEncoder`.

    Args:
        backbone: see :class:`DualEncoder`.
        text_encoder: a frozen text encoder (:mod:`hlss.models.text`); ``None`` only for
            ``head="mlp"``.
        banks: ``{level: AttributeBank}`` (the ``attributes`` config node, built by
            :func:`hlss.models.attributes.attribute_banks`) or ``{level: packaged bank name or
            YAML path}``; ``None`` -> all packaged banks.
        bank_sizes: optional ``{level: size}`` truncations of banks given by name.
        text_cache_dir: text embedding cache folder (``None`` -> ``$HLSS_CACHE/text`` or
            ``~/.cache/hlss/text``).
        head, projection, proj_hidden, mlp_dim, mlp_hidden, center_text, head_init,
            head_per_level: see :class:`DualEncoder`.

    With ``projection="auto"``, a backbone and text encoder that both name a joint space
    (``joint_space`` attribute) but different ones get a learned linear projection even when
    their widths agree.

    Raises:
        ConfigError: ``head="text"`` without a text encoder, or any bank / model problem.
    """
    from hlss.models.attributes import embed_banks, load_banks

    if head == "mlp":
        model = DualEncoder(
            backbone,
            None,
            None,
            head="mlp",
            mlp_dim=mlp_dim,
            mlp_hidden=mlp_hidden,
            head_per_level=head_per_level,
        )
        model.attribute_banks = None
        return model
    if text_encoder is None:
        raise ConfigError("text_encoder: head='text' needs a text encoder")
    if banks is not None and all(isinstance(b, AttributeBank) for b in banks.values()):
        loaded = {lv: banks[lv] for lv in LEVELS if lv in banks}
        unknown = sorted(set(banks) - set(LEVELS))
        if unknown:
            raise ConfigError(
                f"model.banks: unknown level {unknown[0]!r} (levels: {', '.join(LEVELS)})"
            )
    else:
        loaded = load_banks(banks, bank_sizes)
    embeddings = embed_banks(text_encoder, loaded, text_cache_dir)
    b_space = getattr(backbone, "joint_space", None)
    t_space = getattr(text_encoder, "joint_space", None)
    if projection == "auto" and b_space and t_space and b_space != t_space:
        warnings.warn(
            f"backbone joint space {b_space} differs from text encoder's {t_space}; "
            "using a learned linear projection",
            stacklevel=2,
        )
        projection = "linear"
    model = DualEncoder(
        backbone,
        int(text_encoder.dim),
        embeddings,
        head=head,
        projection=projection,
        proj_hidden=proj_hidden,
        mlp_dim=mlp_dim,
        center_text=center_text,
        head_init=head_init,
        head_per_level=head_per_level,
    )
    model.attribute_banks = loaded
    return model
