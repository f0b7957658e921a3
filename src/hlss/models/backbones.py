"""Image backbones: images ``[B, 3, H, W]`` -> features ``[B, F]``.

:func:`build_backbone` is the one constructor (Hydra ``_target_`` of ``conf/backbone/*.yaml``).
Every module it returns carries two attributes the rest of the toolkit relies on:

* ``num_features`` (int): ``F``, the width of the feature vector;
* ``joint_space_dim`` (int | None): the CLIP embedding width when the features already live in a
  CLIP joint image-text space (the visual tower of an open_clip model), else ``None``.

Known names:

* ``resnet18``, ``resnet50``: timm ResNets, classifier removed (global average pooled features);
* ``vit_small``: timm ``vit_small_patch16_224`` with ``dynamic_img_size=True`` and
  ``dynamic_img_pad=True``, so any input size works (64 px, 300 px, ...);
* ``clip_rn50``: the visual tower of an open_clip model (``model="RN50"`` by default; any open_clip
  model name works). Its attention-pool position embedding is interpolated to the input's feature
  grid, so it accepts any input size; other open_clip towers resize the input to their native size.

``pretrained``:

* ``False`` / ``None``: random initialisation (no network);
* ``True``: the library's default weights (timm / open_clip hub download; needs network);
* a string naming an existing local file: a state dict loaded strictly on the backbone keys
  (classifier / text-tower keys are ignored);
* for ``clip_rn50`` also an open_clip tag (``"cc12m"``, ``"openai"``, ...) or an
  ``"hf-hub:org/repo"`` / ``"local-dir:/path"`` model id (hub tags need network).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hlss.errors import ConfigError

#: backbone name -> timm model name
TIMM_MODELS = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "vit_small": "vit_small_patch16_224",
}
#: every name :func:`build_backbone` accepts
KNOWN_BACKBONES = (*TIMM_MODELS, "clip_rn50")

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def build_backbone(name: str, pretrained: bool | str | None = False, **kwargs: Any) -> nn.Module:
    """Build an image backbone mapping ``[B, 3, H, W]`` -> ``[B, F]``.

    Args:
        name: one of :data:`KNOWN_BACKBONES`.
        pretrained: ``False``/``None`` (random init), ``True`` (default hub weights), a local
            checkpoint path, or (``clip_rn50`` only) an open_clip tag / ``hf-hub:`` id.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``) for timm backbones;
            for ``clip_rn50``: ``model`` (open_clip model name, default ``"RN50"``) and
            ``cache_dir`` (open_clip download cache).

    Returns:
        An ``nn.Module`` with attributes ``num_features`` and ``joint_space_dim``.

    Raises:
        ConfigError: unknown name; a local checkpoint that is missing, unreadable or whose keys
            or shapes do not match the backbone; hub weights that cannot be fetched.
    """
    if name in TIMM_MODELS:
        return _build_timm(name, pretrained, **kwargs)
    if name == "clip_rn50":
        return _build_open_clip_visual(pretrained, **kwargs)
    raise ConfigError(
        f"backbone.name: unknown backbone {name!r}; known: {', '.join(KNOWN_BACKBONES)}"
    )


# ----------------------------------------------------------------------------------------------
# helpers shared by both families


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith((".", "~"))
        or value.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _require_file(path: str, what: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: checkpoint file {path!r} not found")
    return path


def _read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or torch file (weights only).

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"model_state_dict": ...}`` and strips
    a ``module.`` prefix (DDP).
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any read failure is a user-facing file problem
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{what}: cannot read checkpoint {path!r}: {msg}") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{what}: {path!r} does not hold a state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def _short_list(keys: list[str], n: int = 4) -> str:
    head = ", ".join(keys[:n])
    return f"{head}, ... ({len(keys)} in all)" if len(keys) > n else head


def _load_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str
) -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line ConfigError on mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short_list(unexpected)}")
        raise ConfigError(
            f"{what}: checkpoint {path!r} does not match the backbone: {'; '.join(parts)}"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise ConfigError(
            f"{what}: checkpoint {path!r} does not match the backbone: {len(bad)} shape mismatch(es), "
            f"first {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        )
    module.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# timm


def _build_timm(name: str, pretrained: bool | str | None, **kwargs: Any) -> nn.Module:
    import timm

    what = f"backbone {name} pretrained"
    model_name = TIMM_MODELS[name]
    kwargs = dict(kwargs)
    kwargs["num_classes"] = 0
    if name == "vit_small":
        kwargs.setdefault("dynamic_img_size", True)
        kwargs.setdefault("dynamic_img_pad", True)
    if isinstance(pretrained, str):
        path = _require_file(pretrained, what)
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        state = _read_state_dict(path, what)
        classifier = model.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        state = {
            k: v for k, v in state.items() if not any(k.startswith(f"{c}.") for c in classifier)
        }
        _load_strict(model, state, path, what)
    elif pretrained:
        try:
            model = timm.create_model(model_name, pretrained=True, **kwargs)
        except Exception as err:  # network / hub failures
            raise ConfigError(
                f"{what}: cannot fetch timm default weights for {model_name} "
                f"({type(err).__name__}); offline, pass a local checkpoint path instead"
            ) from None
    else:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    model.joint_space_dim = None
    return model


# ----------------------------------------------------------------------------------------------
# open_clip visual tower


class OpenCLIPVisual(nn.Module):
    """The visual tower of an open_clip model: ``[B, 3, H, W]`` -> ``[B, E]`` in the joint space.

    For a ``ModifiedResNet`` tower (RN50, RN101, ...) the attention-pool position embedding is
    bilinearly interpolated to the feature grid of the input, so any input size works. Other
    towers (ViTs) get their input resized to the tower's native ``image_size``.

    Attributes:
        visual: the open_clip visual module (its state dict keys are prefixed ``visual.``, like a
            full open_clip checkpoint).
        num_features: ``E``, the joint embedding width.
        joint_space_dim: ``E`` as well (the output already lives in the joint space).
        joint_space: an id of the joint space (``"open_clip:<model>:<weights>"``).
    """

    def __init__(self, visual: nn.Module, embed_dim: int, joint_space: str):
        super().__init__()
        self.visual = visual
        self.num_features = int(embed_dim)
        self.joint_space_dim = int(embed_dim)
        self.joint_space = joint_space
        size = getattr(visual, "image_size", 224)
        self._native_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, 3, H, W] -> [B, E]."""
        v = self.visual
        if hasattr(v, "attnpool") and hasattr(v, "stem"):
            h = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
            return _attnpool_any_size(v.attnpool, h)
        if tuple(x.shape[-2:]) != self._native_size:
            x = F.interpolate(x, size=self._native_size, mode="bilinear", align_corners=False)
        return v(x)


def _attnpool_any_size(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``AttentionPool2d`` forward with the position embedding resized to ``x``'s grid."""
    b, c, h, w = x.shape
    pos = pool.positional_embedding  # [S*S + 1, C]
    side = round((pos.shape[0] - 1) ** 0.5)
    if (h, w) != (side, side):
        grid = pos[1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, c)], dim=0)
    tokens = x.reshape(b, c, h * w).permute(2, 0, 1)  # (HW) B C
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
    tokens = tokens + pos[:, None, :].to(tokens.dtype)
    out, _ = F.multi_head_attention_forward(
        query=tokens[:1],
        key=tokens,
        value=tokens,
        embed_dim_to_check=c,
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=pool.training,
        need_weights=False,
    )
    return out[0]


def activation_matched_name(model: str, tag: str | None) -> str:
    """The open_clip model name whose activation matches the weights of ``tag``.

    OpenAI's CLIP and the RN50/RN101 CC12M and YFCC15M weights were trained with QuickGELU
    (``x * sigmoid(1.702 x)``); open_clip builds ``RN50`` with GELU and only warns when such
    weights are loaded, which shifts every text embedding. For those tags this returns the
    ``-quickgelu`` variant (``"RN50"`` + ``"cc12m"`` -> ``"RN50-quickgelu"``); otherwise ``model``.
    """
    import open_clip

    if tag is None or model.startswith(("hf-hub:", "local-dir:")) or model.endswith("-quickgelu"):
        return model
    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    quick = f"{model}-quickgelu"
    if cfg.get("quick_gelu") and open_clip.get_model_config(quick) is not None:
        return quick
    return model


def open_clip_source(model: str, pretrained: bool | str | None) -> tuple[str, str | None, str]:
    """Resolve ``(model, pretrained)`` to ``(model_name, pretrained_arg, kind)`` for open_clip.

    ``kind`` is ``"random"``, ``"hub"`` (tag or ``hf-hub:`` id) or ``"file"``. For a tag whose
    weights were trained with QuickGELU the model name is the ``-quickgelu`` variant
    (:func:`activation_matched_name`); a checkpoint file is taken with the name given, so name
    the variant yourself (``model=RN50-quickgelu``) for a file of such weights.

    Raises:
        ConfigError: a path-like ``pretrained`` that does not exist, or an unknown tag.
    """
    import open_clip

    if pretrained is None or pretrained is False:
        return model, None, "random"
    if pretrained is True:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if not tags:
            raise ConfigError(f"pretrained: open_clip has no default weights for model {model!r}")
        return activation_matched_name(model, tags[0]), tags[0], "hub"
    if not isinstance(pretrained, str):
        raise ConfigError(
            f"pretrained: expected false, true, a tag or a file path, got {pretrained!r}"
        )
    if pretrained.startswith(("hf-hub:", "local-dir:")):
        return pretrained, None, "hub"
    if model.startswith(("hf-hub:", "local-dir:")):
        return model, None, "hub"
    if os.path.isfile(os.path.expanduser(pretrained)):
        return model, os.path.expanduser(pretrained), "file"
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained in tags:
        return activation_matched_name(model, pretrained), pretrained, "hub"
    if _looks_like_path(pretrained):
        raise ConfigError(f"pretrained: checkpoint file {pretrained!r} not found")
    raise ConfigError(
        f"pretrained: {pretrained!r} is neither a local file nor an open_clip tag of {model} "
        f"(tags: {', '.join(tags) or 'none'})"
    )


def create_open_clip(model: str, pretrained: bool | str | None, cache_dir: str | None = None):
    """Create a full open_clip model (random, hub weights or a full CLIP checkpoint file).

    Returns ``(clip_model, kind, resolved_pretrained)``; a ``"file"`` kind model is returned with
    random weights, the caller loads the file (it may hold only one tower).

    Raises:
        ConfigError: unknown model name, bad ``pretrained``, or hub weights that cannot be fetched.
    """
    import open_clip

    name, arg, kind = open_clip_source(model, pretrained)
    if kind == "random" or kind == "file":
        if open_clip.get_model_config(name) is None:
            raise ConfigError(f"model: unknown open_clip model {name!r}")
        clip = open_clip.create_model(name, pretrained=None, pretrained_text=False)
        return clip, kind, arg
    try:
        clip = open_clip.create_model(
            name, pretrained=arg, cache_dir=cache_dir, pretrained_text=False
        )
    except Exception as err:  # network / hub failures
        msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"pretrained: cannot fetch open_clip weights {arg or name!r} for {model} ({msg}); "
            "offline, pass a local checkpoint file instead"
        ) from None
    return clip, kind, arg


def _build_open_clip_visual(
    pretrained: bool | str | None, model: str = "RN50", cache_dir: str | None = None
) -> OpenCLIPVisual:
    what = "backbone clip_rn50 pretrained"
    try:
        name, arg, kind = open_clip_source(model, pretrained)
        visual = _visual_tower_only(name) if kind in ("random", "file") else None
        if visual is None:
            clip, kind, arg = create_open_clip(model, pretrained, cache_dir)
            visual = clip.visual
            del clip
    except ConfigError as err:
        raise ConfigError(f"backbone clip_rn50 {err}") from None
    embed_dim = getattr(visual, "output_dim", None) or _config_embed_dim(name)
    if embed_dim is None:
        raise ConfigError(f"backbone clip_rn50: cannot tell the embedding width of {model!r}")
    space = f"open_clip:{name}:{pretrained if kind != 'file' else os.path.abspath(arg)}"
    backbone = OpenCLIPVisual(visual, embed_dim, joint_space=space)
    if kind == "file":
        state = _read_state_dict(arg, what)
        if any(k.startswith("visual.") for k in state):
            # a full open_clip checkpoint (or one of our backbones): keep the visual tower only
            state = {k: v for k, v in state.items() if k.startswith("visual.")}
        else:
            state = {f"visual.{k}": v for k, v in state.items()}
        _load_strict(backbone, state, arg, what)
    return backbone


def _config_embed_dim(model: str) -> int | None:
    import open_clip

    cfg = None if model.startswith(("hf-hub:", "local-dir:")) else open_clip.get_model_config(model)
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None


def _visual_tower_only(model: str) -> nn.Module | None:
    """A randomly initialised open_clip visual tower without building the text tower.

    Returns ``None`` when open_clip's (private) tower builder is unavailable, so the caller falls
    back to building the whole model.

    Raises:
        ConfigError: ``model`` is not an open_clip model name.
    """
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ConfigError(f"model: unknown open_clip model {model!r}")
    try:
        from open_clip.model import _build_vision_tower

        return _build_vision_tower(
            cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False)
        )
    except Exception:  # private API changed: build the full model instead
        return None
