"""The hierarchy levels of pathology data, finest first.

Two images are positives at a level when their ids at that level match: views of one patch,
patches of one slide, slides of one patient. Every module that loops over levels imports them
from here.
"""

from __future__ import annotations

LEVELS: tuple[str, ...] = ("patch", "slide", "patient")
