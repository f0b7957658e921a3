"""hlss: hierarchical language-tied self-supervised learning for histopathology."""

__version__ = "0.1.0"

CLASSES_OPENSRH = ("hgg", "lgg", "mening", "metast", "normal", "pituita", "schwan")
