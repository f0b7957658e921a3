"""Schemas of the smaller commands' primary configs: ``hlss-synth``, ``hlss-validate`` and
``hlss-demo`` (``conf/synth.yaml``, ``conf/validate.yaml``, ``conf/demo.yaml``).

The defaults and comments users see live in the YAML files; these dataclasses fix the keys and
their types, so Hydra refuses ``size=abc`` or ``workers=abc`` when it composes, and
:func:`hlss.config.check_schema` refuses a key they do not have (``+sise=3``). A ``MISSING``
field is required on the command line (``out=`` for synth, ``root=`` for validate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from hlss.errors import ConfigError


@dataclass
class SynthConfig:
    """``hlss-synth``: the arguments of :func:`hlss.data.synthetic.generate_opensrh`."""

    out: str = MISSING
    seed: int = 0
    patients_per_class: int = 4
    slides_per_patient: int = 2
    patches_per_slide: int = 8
    nondiagnostic_per_slide: int = 1
    size: int = 300
    val_fraction: float = 0.25
    nuisance: float = 1.0


@dataclass
class ValidateConfig:
    """``hlss-validate``: the OpenSRH-layout dataset to check and how (see
    :func:`hlss.data.validate.validate_opensrh`)."""

    root: str = MISSING
    check_images: bool = True
    expected_size: int = 0
    workers: int = 4
    clean_out: str | None = None
    include_nondiagnostic: bool = False
    max_examples: int = 5
    meta_file: str | None = None
    split_file: str | None = None
    strict: bool = False


@dataclass
class DemoConfig:
    """``hlss-demo``: the size of the synthetic dataset and of the two training runs."""

    out: str = "demo"
    steps: int = 300
    patients: int = 8
    patients_per_class: int = 8
    slides_per_patient: int = 2
    patches_per_slide: int = 8
    size: int = 64
    seed: int = 0


def register(store: ConfigStore) -> None:
    """Store the three schemas as ``synth_schema``, ``validate_schema`` and ``demo_schema``."""
    store.store(name="synth_schema", node=SynthConfig)
    store.store(name="validate_schema", node=ValidateConfig)
    store.store(name="demo_schema", node=DemoConfig)


def to_typed(cfg: DictConfig) -> Any:
    """The composed config of a schema-backed command as its dataclass instance.

    Raises:
        ConfigError: a required (``???``) key was not given; one line naming it.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        given = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"{', '.join(missing)}: required; set it on the command line ({given})")
    return OmegaConf.to_object(cfg)
