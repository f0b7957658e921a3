"""BaseTransform(resize=True): the whole patch resized, as the HLSS paper fed CLIP's RN50."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hlss.data.transforms import BaseTransform, srh_base


def test_resize_keeps_the_whole_field_of_view():
    raw = np.zeros((2, 30, 30), np.uint16)
    raw[1, :3, :3] = 60000  # a bright corner that a centre crop would cut away
    cropped = BaseTransform("srh", size=12)(raw)
    resized = BaseTransform("srh", size=12, resize=True)(raw)
    assert cropped.shape == resized.shape == (3, 12, 12)
    assert resized[2, 0, 0] > 0.3 and cropped[2, 0, 0] < 0.1
    ref = F.interpolate(srh_base(raw)[None], size=(12, 12), mode="bicubic", antialias=True)[0]
    torch.testing.assert_close(resized, ref.clamp(0, 1))
    assert resized.min() >= 0 and resized.max() <= 1


def test_resize_to_the_native_size_is_the_identity():
    raw = np.random.default_rng(0).integers(0, 60000, size=(2, 16, 16), dtype=np.uint16)
    torch.testing.assert_close(BaseTransform("srh", size=16, resize=True)(raw), srh_base(raw))
    assert "resize=True" in repr(BaseTransform("srh", size=16, resize=True))
