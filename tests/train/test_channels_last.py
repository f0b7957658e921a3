"""``channels_last``: the model and its images in channels-last memory order (a GPU speed-up)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from hlss.errors import HLSSError
from hlss.train.module import HLSSModule
from hlss.train.optim import adamw_warmup_cosine
from tests.train.test_module import fake_batch


def module(channels_last, compile=False):
    from hlss import losses
    from hlss.models.backbones import build_backbone
    from hlss.models.dual_encoder import DualEncoder

    torch.manual_seed(0)
    banks = {
        lv: torch.nn.functional.normalize(torch.randn(a, 16), dim=1)
        for lv, a in (("patch", 5), ("slide", 4), ("patient", 3))
    }
    model = DualEncoder(build_backbone("resnet18"), 16, banks, head="text")
    objective = losses.HLSSObjective(
        losses.HierarchicalVisualContrast(), align=losses.NearestDescriptionKL()
    )
    return HLSSModule(
        model,
        objective,
        optimizer=partial(adamw_warmup_cosine, lr=1e-2),
        channels_last=channels_last,
        compile=compile,
    )


def conv_weight(m: HLSSModule) -> torch.Tensor:
    return m.model.backbone.conv1.weight


@pytest.mark.parametrize("wanted", [True, "auto"])
def test_channels_last_converts_weights_only_when_asked(wanted):
    m = module(wanted)
    m.setup("fit")  # no trainer: auto follows the module's device, the CPU here
    converted = conv_weight(m).is_contiguous(memory_format=torch.channels_last)
    assert converted == (wanted is True)
    assert conv_weight(m).is_contiguous() != converted


def test_channels_last_gives_the_same_losses_and_gradients():
    batch = fake_batch(P=2, S=2, N=2, T=2, size=32)
    plain, fast = module(False), module(True)
    plain.setup("fit")
    fast.setup("fit")
    a, b = plain.compute_losses(batch), fast.compute_losses(batch)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    a["loss"].backward()
    b["loss"].backward()
    g_plain, g_fast = conv_weight(plain).grad, conv_weight(fast).grad
    assert ((g_plain - g_fast).norm() / g_plain.norm()).item() < 1e-4  # summation order only
    assert conv_weight(fast).grad.abs().sum() > 0


@pytest.mark.parametrize("value", ["yes", 1.5, None])
def test_bad_channels_last_value_is_one_clear_error(value):
    with pytest.raises(HLSSError, match="channels_last must be auto, true or false"):
        module(value)


def test_auto_follows_the_trainers_device():
    from types import SimpleNamespace

    m = module("auto")
    m._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    m.setup("fit")  # converts the weights only; nothing runs on the device here
    m._trainer = None
    assert conv_weight(m).is_contiguous(memory_format=torch.channels_last)
