"""The backbone of a checkpoint as the plain library model names it, and the other weights.

A timm backbone in hlss *is* ``timm.create_model(name, num_classes=0)``, so its state dict keys
are timm's; an open_clip backbone wraps the visual tower as ``.visual``, so ``visual.`` is
dropped to get the keys of ``open_clip.create_model(name).visual``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from hlss.errors import ConfigError, HLSSError
from hlss.levels import LEVELS

if TYPE_CHECKING:
    import torch

BACKBONE_FILE = "backbone.safetensors"
MODEL_PREFIX = "model."
BACKBONE_PREFIX = "model.backbone."


# ----------------------------------------------------------------------------- the library model


@dataclass(frozen=True)
class LibraryModel:
    """How a plain library builds the backbone: ``<function>(architecture, **kwargs)[.visual]``.

    Attributes:
        library: ``"timm"`` or ``"open_clip"``.
        architecture: the library's model name (``"resnet18"``, ``"RN50"``, ...).
        kwargs: keyword arguments of the create call.
        prefix: the key prefix of the hlss backbone's state dict that the plain model lacks
            (``"visual."`` for open_clip towers, ``""`` for timm).
    """

    library: str
    architecture: str
    kwargs: dict = field(default_factory=dict)
    prefix: str = ""

    @property
    def create_call(self) -> str:
        """The Python expression that builds the plain model, e.g.
        ``timm.create_model('resnet18', pretrained=False, num_classes=0)``."""
        args = ", ".join([repr(self.architecture), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        if self.library == "timm":
            return f"timm.create_model({args})"
        return f"open_clip.create_model({args}).visual"

    def load_code(self, weights: str = BACKBONE_FILE) -> str:
        """Three lines of Python that load ``weights`` into the plain model, without hlss."""
        return (
            f"import safetensors.torch, {self.library}\n"
            f"model = {self.create_call}\n"
            f"model.load_state_dict(safetensors.torch.load_file({weights!r}))"
        )

    def create(self) -> torch.nn.Module:
        """Build the plain model (random weights) exactly as :attr:`create_call` does.

        Raises:
            HLSSError: the library cannot build it (unknown name, a hub model offline).
        """
        import logging

        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip: "No pretrained weights loaded ..."
        try:
            if self.library == "timm":
                import timm

                return timm.create_model(self.architecture, **self.kwargs)
            import open_clip

            return open_clip.create_model(self.architecture, **self.kwargs).visual
        except Exception as err:  # any library failure: name it in one line
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise HLSSError(
                f"{self.create_call}: cannot build the plain model ({type(err).__name__}: {first})"
            ) from None
        finally:
            logging.disable(previous)


def backbone_node(cfg: DictConfig) -> DictConfig:
    """The backbone node of a run config: ``model.backbone`` (resolved configs), else ``backbone``.

    Raises:
        ConfigError: there is none, or it is not built by ``hlss.models.backbones.build_backbone``.
    """
    model = cfg.get("model")
    node = model.get("backbone") if isinstance(model, DictConfig) else None
    node = node if isinstance(node, DictConfig) else cfg.get("backbone")
    target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
    if not target.endswith("build_backbone"):
        raise ConfigError(
            "model.backbone: only backbones of hlss.models.backbones.build_backbone can be "
            f"exported (got {target or 'no _target_'})"
        )
    return node


def library_model(node: DictConfig) -> LibraryModel:
    """The plain library model of a ``build_backbone`` node (its extra keys become create kwargs).

    Raises:
        ConfigError: an unknown backbone name.
    """
    from hlss.models.backbones import TIMM_MODELS

    args = OmegaConf.to_container(node, resolve=True)
    name = args.pop("name", None)
    for key in ("_target_", "pretrained", "cache_dir"):
        args.pop(key, None)
    if name in TIMM_MODELS:
        kwargs = {"pretrained": False, "num_classes": 0}
        if name == "vit_small":  # as hlss.models.backbones._build_timm builds it: any input size
            kwargs.update(dynamic_img_size=True, dynamic_img_pad=True)
        kwargs.update({k: v for k, v in args.items() if k != "num_classes"})
        return LibraryModel("timm", TIMM_MODELS[name], kwargs)
    if name == "clip_rn50":
        model = str(args.pop("model", "RN50"))
        return LibraryModel("open_clip", model, {"pretrained": None}, prefix="visual.")
    raise ConfigError(f"model.backbone.name: cannot export backbone {name!r}")


def feature_dim(plain: torch.nn.Module) -> int | None:
    """``F`` of a plain timm model (``num_features``) or open_clip tower (``output_dim``)."""
    for attr in ("num_features", "output_dim"):
        value = getattr(plain, attr, None)
        if isinstance(value, int):
            return value
    return None


def native_input(plain: LibraryModel, model: torch.nn.Module) -> dict:
    """``{"size": [H, W], "size_note": ...}`` for an open_clip tower, whose own forward needs its
    native size; ``{}`` for timm models (any size, as in hlss)."""
    if plain.library != "open_clip":
        return {}
    size = getattr(model, "image_size", 224)
    return {
        "size": list(size) if isinstance(size, (tuple, list)) else [size, size],
        "size_note": (
            "open_clip's own forward needs this size; for other sizes hlss interpolates the "
            "attention-pool position embedding (ResNet towers) or resizes the input (ViT towers)"
        ),
    }


# ----------------------------------------------------------------------------- weights


def cast(tensors: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype`` (a :data:`DTYPES` name; integer buffers kept), as
    contiguous unshared copies (what safetensors stores)."""
    import torch

    target = getattr(torch, dtype)
    return {
        k: (v.to(target) if v.is_floating_point() else v).detach().clone().contiguous()
        for k, v in tensors.items()
    }


def backbone_weights(state_dict: Mapping, plain: LibraryModel, path: str) -> dict:
    """The backbone entries of a Lightning ``state_dict``, named as the plain model names them.

    Raises:
        HLSSError: the checkpoint holds no ``model.backbone.<prefix>*`` weights.
    """
    prefix = BACKBONE_PREFIX + plain.prefix
    weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not weights:
        raise HLSSError(f"{path}: checkpoint holds no backbone weights (no '{prefix}*' keys)")
    return weights


def check_strict(model: torch.nn.Module, weights: Mapping, plain: LibraryModel, path: str) -> None:
    """``model.load_state_dict(weights, strict=True)``, refused in one line on a mismatch.

    Raises:
        HLSSError: missing or unexpected keys or a shape mismatch (names a few).
    """
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    shaped = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    problems = [
        f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shaped))
        if keys
    ]
    if problems:
        raise HLSSError(
            f"{path}: backbone weights do not fit {plain.create_call}: {'; '.join(problems)}"
        )
    model.load_state_dict(weights, strict=True)


def head_weights(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Every ``model.*`` entry that is not the backbone's: ``projection.*``, ``heads.<level>.*``,
    ``text_<level>`` (text heads) or ``head.*`` (the HiDisc MLP), without the ``model.`` prefix."""
    return {
        k[len(MODEL_PREFIX) :]: v
        for k, v in state_dict.items()
        if k.startswith(MODEL_PREFIX) and not k.startswith(BACKBONE_PREFIX)
    }


def attribute_names(run_dir: str, cfg: DictConfig) -> dict[str, list[str]]:
    """``{level: names}`` of the run's attribute banks: its ``attributes.json``, else the banks
    its config names; ``{}`` when neither can be read."""
    path = os.path.join(run_dir, "attributes.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return {lv: list(bank["names"]) for lv, bank in json.load(handle).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if not isinstance(cfg.get("attributes"), DictConfig):
        return {}
    from hlss.config import build

    try:
        return {lv: list(bank.names) for lv, bank in build(cfg.attributes).items()}
    except HLSSError:
        return {}


def describe_heads(heads: Mapping[str, torch.Tensor], names: Mapping[str, list[str]]) -> dict:
    """The ``heads`` entry of ``export.json``: kind, projection, levels, widths, attribute names
    (only where the name count matches the head's rows)."""
    if not any(k.startswith(("heads.", "projection.", "text_")) for k in heads):
        layers = sorted({int(k.split(".")[1]) for k in heads if k.startswith("head.")})
        use = "features"
        for i, layer in enumerate(layers):
            use = f"head.{layer}({'relu(' + use + ')' if i else use})"
        return {"kind": "mlp", "use": f"head = {use}  # HiDisc projection"}
    if "projection.weight" in heads:
        projection = "linear"
    elif "projection.0.weight" in heads:
        projection = "mlp"
    else:
        projection = "identity"
    levels = [lv for lv in LEVELS if f"text_{lv}" in heads]
    return {
        "kind": "text",
        "projection": projection,
        "text_dim": int(heads[f"text_{levels[0]}"].shape[1]) if levels else None,
        "levels": levels,
        "attributes": {
            lv: names[lv]
            for lv in levels
            if lv in names and len(names[lv]) == heads[f"text_{lv}"].shape[0]
        },
        "use": (
            "text = normalize(projection(features)); scores[level] = text @ heads.<level>.weight.T "
            "(row j: attribute j of the level; text_<level>: its frozen text embedding)"
        ),
    }
