"""From a composed config to objects: the one place that turns config nodes into objects.

Every object of a run is a ``_target_`` node that Hydra instantiates; this module adds what Hydra
does not do: errors as one line (:func:`build`), the check of every ``_target_`` node against its
target's signature right after composition (:func:`check_targets`), the resolvers the configs
use (:func:`register_resolvers`), and the few named builders that train, eval, benchmarks and
tests share (:func:`build_model`, :func:`build_objective`, :func:`build_datamodule`).
"""

from __future__ import annotations

import functools
import inspect
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hlss.errors import ConfigError, HLSSError


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that reports problems as one line.

    An :class:`HLSSError` raised by the constructor (a missing dataset root, a bad bank file...)
    comes out as itself rather than wrapped in Hydra's multi-line message; any other failure
    becomes a :class:`ConfigError` naming the target and the cause.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, HLSSError):
            raise cause from None
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        text = str(cause if cause is not None else err).strip()
        first = text.splitlines()[0] if text else ""
        detail = f"{type(cause).__name__}: {first}" if cause is not None else first
        raise ConfigError(f"cannot build {target}: {detail}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(config_message(err)) from None


def config_message(err: OmegaConfBaseException) -> str:
    """One line for an OmegaConf error (e.g. a required ``???`` value that was not given)."""
    key = getattr(err, "full_key", None)
    msg = str(getattr(err, "msg", "") or err).splitlines()[0]
    if "Missing mandatory value" in msg:
        return f"{key or 'a key'} is required: set it on the command line ({msg.split(':')[-1].strip()}=...)"
    return f"{key}: {msg}" if key else msg


# --------------------------------------------------------------------------- resolvers


def register_resolvers() -> None:
    """``${abspath:rel}``: a path made absolute against the directory the command runs in;
    ``${auto_precision:}``: the trainer precision for this machine
    (:func:`hlss.devices.auto_precision`)."""

    def auto_precision() -> str:  # torch is imported when the value is read, not before
        from hlss.devices import auto_precision as choose

        return choose()

    OmegaConf.register_new_resolver(
        "abspath", lambda p: os.path.abspath(os.path.expanduser(str(p))), replace=True
    )
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)


# --------------------------------------------------------------------------- signature check

_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _locate(path: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(path)
    except Exception as err:  # import errors of every kind
        raise ConfigError(f"_target_ {path}: cannot be imported ({err})") from None


@functools.lru_cache(maxsize=256)
def _signature(path: str) -> inspect.Signature | None:
    target = _locate(path)
    call = target.__init__ if inspect.isclass(target) else target
    for eval_str in (True, False):
        try:
            return inspect.signature(call, eval_str=eval_str)
        except (TypeError, ValueError, NameError):
            continue
    return None


def _scalar_types(annotation: Any) -> tuple[type, ...] | None:
    """The scalar types an annotation admits (``None`` included as ``type(None)``), or ``None``
    when it admits anything else too (containers, modules, callables, ``Any``...)."""
    if annotation in _SCALARS or annotation is type(None):
        return (annotation,)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(annotation):
            sub = _scalar_types(arg)
            if sub is None:
                return None
            out.extend(sub)
        return tuple(out)
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(annotation)})
    return None


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return type(value) in allowed


def _expected(allowed: tuple[type, ...]) -> str:
    words = [_SCALARS[t] for t in allowed if t in _SCALARS]
    if type(None) in allowed:
        words.append("null")
    return " or ".join(words)


def check_targets(cfg: DictConfig, skip: tuple[str, ...] = ("hydra",)) -> None:
    """Hold every ``_target_`` node of ``cfg`` against its target's signature.

    Catches, before anything is built, a key the target does not take (``+loss.temprature=0.1``)
    and a scalar of the wrong type for an annotated parameter (``loss.temperature=abc``,
    ``trainer.max_steps=abc``). Targets taking ``**kwargs`` accept any key; parameters whose
    annotation is not a plain scalar (modules, mappings, callables) are not type-checked.

    Raises:
        ConfigError: one line naming the key, the target and what it expects.
    """

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            keys = [str(k) for k in node]
            if "_target_" in keys:
                check_node(node, prefix)
            for key in keys:
                if key.startswith("_") or (not prefix and key in skip):
                    continue
                if OmegaConf.is_interpolation(node, key):
                    continue  # checked where it points to
                walk(node._get_node(key), f"{prefix}.{key}" if prefix else key)
        elif isinstance(node, ListConfig):
            for i, item in enumerate(node._iter_ex(resolve=False)):
                walk(item, f"{prefix}[{i}]")

    def check_node(node: DictConfig, prefix: str) -> None:
        path = str(node["_target_"])
        signature = _signature(path)
        if signature is None:
            return
        params = signature.parameters
        open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key in node:
            key = str(key)
            if key.startswith("_"):
                continue
            where = f"{prefix}.{key}" if prefix else key
            param = params.get(key)
            if param is None or param.kind in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            ):
                if open_kwargs:
                    continue
                takes = ", ".join(
                    n
                    for n, p in params.items()
                    if n != "self"
                    and p.kind not in (inspect.Parameter.VAR_POSITIONAL, p.VAR_KEYWORD)
                )
                raise ConfigError(f"{where}: unknown key for {path} (it takes: {takes})")
            if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue
            value = node._get_node(key)
            if isinstance(value, DictConfig | ListConfig):
                continue
            allowed = _scalar_types(param.annotation)
            if allowed is None:
                continue
            raw = value._value()
            if not _fits(raw, allowed):
                raise ConfigError(f"{where}: expected {_expected(allowed)}, got {raw!r}")

    walk(cfg, "")


def check_schema(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """Refuse keys that ``schema`` (a dataclass) does not have, at every typed level of ``cfg``.

    Hydra types the values of a schema's fields when it composes, but a key added with ``+``
    (``+knn.kk=5``, ``+sed=1``) slips through; this check names it. Fields typed ``Any`` are
    open (their ``_target_`` nodes are checked by :func:`check_targets`).

    Raises:
        ConfigError: one line naming the unknown key and the known ones.
    """
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg:
        key = str(key)
        if prefix == "" and key == "hydra":
            continue
        where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{where}: unknown key (known here: {known})")
        kind = fields[key].type
        if isinstance(kind, str):
            kind = typing.get_type_hints(schema).get(key)
        if dataclasses.is_dataclass(kind) and not OmegaConf.is_interpolation(cfg, key):
            sub = cfg._get_node(key)
            if isinstance(sub, DictConfig):
                check_schema(sub, kind, where)


def check_config(cfg: DictConfig, schema: type) -> None:
    """:func:`check_schema` then :func:`check_targets`: everything that can be refused before
    anything is built."""
    check_schema(cfg, schema)
    check_targets(cfg)


# --------------------------------------------------------------------------- named builders


def _require_target(cfg: DictConfig, key: str) -> DictConfig:
    node = cfg.get(key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(
            f"{key}: the config has no `{key}._target_` node (a run config written before "
            "hlss 0.2?); retrain, or compose a current config for it"
        )
    return node


def build_model(cfg: DictConfig):
    """The dual encoder of ``cfg.model`` (backbone, projection, heads, frozen text embeddings).

    The returned :class:`hlss.models.dual_encoder.DualEncoder` carries ``attribute_banks``
    (``{level: AttributeBank}``, or ``None`` for the HiDisc head).
    """
    return build(_require_target(cfg, "model"))


def has_text_space(cfg: DictConfig) -> bool:
    """Whether the model of ``cfg`` has text heads and a text space (without building it)."""
    model = cfg.get("model")
    return isinstance(model, DictConfig) and str(model.get("head", "text")) == "text"


def attribute_banks(cfg: DictConfig) -> dict | None:
    """``{level: AttributeBank}`` of the model of ``cfg`` (``None`` without text heads)."""
    if not has_text_space(cfg):
        return None
    node = cfg.model.get("banks")
    if node is None:
        from hlss.models.attributes import load_banks

        modality = OmegaConf.select(cfg, "dataset.modality", default="srh")
        return load_banks(modality=str(modality))
    return build(node)


def build_objective(cfg: DictConfig):
    """The multi-level objective of ``cfg.loss`` (HVC + optional language tie)."""
    return build(_require_target(cfg, "loss"))


def build_datamodule(cfg: DictConfig):
    """The training data module of ``cfg.loader``; the patch table of ``cfg.dataset.table`` is
    indexed lazily (in ``setup``, once per process)."""
    table_cfg = cfg.dataset.table

    def make_table():
        return build(table_cfg)

    return build(
        _require_target(cfg, "loader"),
        table=make_table,
        transform=build(cfg.dataset.transform),
        augment=build(cfg.augment),
        _convert_="object",
    )


def build_callbacks(cfg: DictConfig) -> list:
    """The Lightning callbacks of ``cfg.callbacks`` (a mapping of ``_target_`` nodes; ``null``
    entries are left out), in the order they are listed."""
    node = cfg.get("callbacks")
    if not node:
        return []
    if not isinstance(node, Mapping | DictConfig):
        raise ConfigError("callbacks: expected a mapping of callback nodes")
    out = []
    for name, sub in node.items():
        if sub is None:
            continue
        if not isinstance(sub, DictConfig) or "_target_" not in sub:
            raise ConfigError(f"callbacks.{name}: not a callback node (no _target_)")
        out.append(build(sub))
    return out


def resolved_container(cfg: DictConfig) -> dict:
    """The config as plain, fully resolved Python containers (what checkpoints and MLflow keep)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
