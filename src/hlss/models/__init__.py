"""Models: image backbones, frozen text encoders (with an embedding cache), attribute banks and
the dual encoder that ties them together.

Nothing is loaded at import: timm / open_clip / sentence-transformers are imported, and weights
read, only when a backbone or encoder is built or first used.
"""

from hlss.models.attributes import (
    LEVELS,
    AttributeBank,
    embed_banks,
    load_bank,
    load_banks,
    packaged_bank_names,
)
from hlss.models.backbones import KNOWN_BACKBONES, OpenCLIPVisual, build_backbone
from hlss.models.dual_encoder import DualEncoder, build_dual_encoder
from hlss.models.text import (
    MiniLMTextEncoder,
    OpenCLIPTextEncoder,
    TinyTextEncoder,
    default_cache_dir,
    embed_prompts,
)

__all__ = [
    "KNOWN_BACKBONES",
    "LEVELS",
    "AttributeBank",
    "DualEncoder",
    "MiniLMTextEncoder",
    "OpenCLIPTextEncoder",
    "OpenCLIPVisual",
    "TinyTextEncoder",
    "build_backbone",
    "build_dual_encoder",
    "default_cache_dir",
    "embed_banks",
    "embed_prompts",
    "load_bank",
    "load_banks",
    "packaged_bank_names",
]
