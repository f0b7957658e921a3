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


def losses_and_gradients_agree(
    plain: HLSSModule, other: HLSSModule, loss_atol: float, grad_rel: float
) -> None:
    """Set both modules up for fit, run one fake batch through each and assert that every loss
    term agrees to ``loss_atol`` and the first conv's gradient to ``grad_rel`` (relative norm),
    and that the gradient reaches ``other``'s backbone."""
    batch = fake_batch(P=2, S=2, N=2, T=2, size=32)
    plain.setup("fit")
    other.setup("fit")
    a, b = plain.compute_losses(batch), other.compute_losses(batch)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=loss_atol), key
    a["loss"].backward()
    b["loss"].backward()
    g_plain, g_other = conv_weight(plain).grad, conv_weight(other).grad
    assert ((g_plain - g_other).norm() / g_plain.norm()).item() < grad_rel
    assert g_other.abs().sum() > 0


def test_channels_last_gives_the_same_losses_and_gradients():
    # the summation order only differs
    losses_and_gradients_agree(module(False), module(True), loss_atol=1e-5, grad_rel=1e-4)


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
