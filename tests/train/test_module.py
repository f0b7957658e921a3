"""Training pieces: ids per level, schedule, atomic checkpoints, non-finite loss stop, DDP."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hlss.checkpoints import AtomicCheckpointIO, find_checkpoint, load_checkpoint_file
from hlss.errors import ConfigError, HLSSError
from hlss.train.module import HLSSModule, NonFiniteLossError, hierarchy_ids
from hlss.train.optim import adamw_warmup_cosine
from tests.train.helpers import TINY, read_batches, summaries


def fake_batch(P=2, S=2, N=2, T=2, size=8):
    return {
        "image": torch.rand(P, S, N, T, 3, size, size),
        "patient": torch.arange(P) + 10,
        "slide": torch.arange(P * S).view(P, S) + 100,
        "patch": torch.arange(P * S * N).view(P, S, N) + 1000,
        "label": torch.zeros(P, dtype=torch.long),
        "bad": torch.zeros(P, dtype=torch.long),
    }


def test_hierarchy_ids_follow_flatten_order():
    batch = fake_batch(P=2, S=3, N=2, T=2)
    ids = hierarchy_ids(batch)
    flat_index = torch.arange(2 * 3 * 2 * 2).view(2, 3, 2, 2)
    for p in range(2):
        for s in range(3):
            for n in range(2):
                for t in range(2):
                    i = flat_index[p, s, n, t]
                    assert ids["patient"][i] == batch["patient"][p]
                    assert ids["slide"][i] == batch["slide"][p, s]
                    assert ids["patch"][i] == batch["patch"][p, s, n]


def warmup_cosine_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """The schedule's formula written out: linear warm-up to 1, then half a cosine to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_warmup_cosine_formula():
    total, warm = 100, 10
    factors = [warmup_cosine_factor(s, total, warm) for s in range(total + 5)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(factors[:10]))
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5, abs=1e-9)
    assert factors[100] == pytest.approx(0.0, abs=1e-12) and factors[104] == pytest.approx(
        0.0, abs=1e-12
    )
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


@pytest.mark.parametrize(
    ("total", "fraction", "min_ratio"),
    [(20, 0.25, 0.0), (100, 0.1, 0.0), (37, 0.1, 0.2), (10, 0.0, 0.0), (10, 0.1, 0.0)],
)
def test_schedule_follows_formula(total, fraction, min_ratio):
    lr = 0.5
    opt, sched = adamw_warmup_cosine(
        [torch.nn.Parameter(torch.zeros(1))],
        total_steps=total,
        lr=lr,
        warmup_fraction=fraction,
        min_lr_ratio=min_ratio,
    )
    warm = round(fraction * total)
    for step in range(total):
        expected = lr * warmup_cosine_factor(step, total, warm, min_ratio)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-9), step
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * min_ratio, abs=1e-9)


def test_extended_run_follows_the_longer_schedule():
    """Resuming with a larger total (trainer.max_steps extended) continues on the new schedule,
    not on the old one restored from the checkpoint."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt, sched = adamw_warmup_cosine(params, total_steps=4, lr=0.1, warmup_fraction=0.25)
    for _ in range(3):
        opt.step()
        sched.step()
    opt2, sched2 = adamw_warmup_cosine(params, total_steps=40, lr=0.1, warmup_fraction=0.25)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    rates = []
    for _ in range(10):
        opt2.step()
        sched2.step()
        rates.append(opt2.param_groups[0]["lr"])
    expected = [0.1 * warmup_cosine_factor(s, 40, 10) for s in range(4, 14)]
    assert rates == pytest.approx(expected, rel=1e-6)


def test_schedule_state_round_trips():
    """The scheduler resumes from its state dict at the same learning rate (checkpoints)."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt, sched = adamw_warmup_cosine(params, total_steps=30, lr=0.1, warmup_fraction=0.2)
    for _ in range(9):
        opt.step()
        sched.step()
    opt2, sched2 = adamw_warmup_cosine(params, total_steps=30, lr=0.1, warmup_fraction=0.2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0}, {"total_steps": 0}, {"warmup_fraction": 1.0}, {"min_lr_ratio": 2}]
)
def test_schedule_config_errors(kwargs):
    args = {"total_steps": 10, **kwargs}
    with pytest.raises(ConfigError):
        adamw_warmup_cosine([torch.nn.Parameter(torch.zeros(1))], **args)


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))

    def forward(self, x):
        return {"heads": self.net(x)}


class NaNAtStep(torch.nn.Module):
    """An objective that is finite until ``step`` calls, then NaN."""

    def __init__(self, step):
        super().__init__()
        self.calls, self.step = 0, step

    def forward(self, heads, ids, text_embeddings=None, text_space=None):
        self.calls += 1
        loss = heads.pow(2).mean()
        if self.calls >= self.step:
            loss = loss * float("nan")
        return {"loss": loss}


class ListData(L.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader([fake_batch()] * 10, batch_size=None)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from functools import partial

    module = HLSSModule(
        TinyModel(), NaNAtStep(step=3), optimizer=partial(adamw_warmup_cosine, lr=1e-3)
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        max_steps=10,
        logger=False,
        callbacks=[ckpt],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at step 2"):
        trainer.fit(module, datamodule=ListData())
    state = load_checkpoint_file(str(tmp_path / "last.ckpt"))
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "c.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, str(target))
    before = target.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"a": torch.zeros(2)}, str(target))
    assert target.read_bytes() == before  # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["c.ckpt"]


def test_find_checkpoint(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"x")
    assert find_checkpoint(str(tmp_path / "run"), str(tmp_path)) == str(run / "last.ckpt")
    assert find_checkpoint("auto", str(tmp_path)) == str(run / "last.ckpt")
    with pytest.raises(HLSSError, match=r"no last\.ckpt"):
        find_checkpoint("auto", str(tmp_path / "run" / "checkpoints" / "x"))
    with pytest.raises(HLSSError, match="checkpoint not found"):
        find_checkpoint(str(tmp_path / "nope.ckpt"), str(tmp_path))


def ddp_run(cwd, *extra: str) -> dict:
    """Two steps of ``loss=attr3levels`` in two CPU processes (gloo DDP); the run's summary."""
    os.makedirs(cwd, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    args = [a for a in TINY if not a.startswith("loader.patients")]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hlss.cli.train",
            *args,
            "logger=none",
            "loss=attr3levels",
            "loader.patients=2",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = summaries(str(cwd / "outputs"))
    assert summary["global_step"] == 2
    return summary


def test_ddp_two_cpu_processes_see_distinct_patients(tmp_path):
    summary = ddp_run(tmp_path, "callbacks=[default,batch_record]")
    ranks = [read_batches(summary["output_dir"], rank) for rank in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2]
    for step in range(2):
        p0, p1 = set(ranks[0][step]["patients"]), set(ranks[1][step]["patients"])
        assert len(p0) == 2 and len(p1) == 2
        assert not p0 & p1  # each rank trains on its own patients


def test_ddp_with_compile_trains_the_same_weights(tmp_path):
    """``compile`` under DDP: the compiled forward and objective still hand every gradient to
    DDP's all-reduce (AOTAutograd, as inductor uses it), so two steps end on the weights of the
    eager run; a rank that kept its own gradient would not."""
    eager = ddp_run(tmp_path / "eager")
    compiled = ddp_run(tmp_path / "compiled", "compile={backend:aot_eager}")
    a = load_checkpoint_file(eager["last_checkpoint"])["state_dict"]
    b = load_checkpoint_file(compiled["last_checkpoint"])["state_dict"]
    assert list(a) == list(b)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-4), key


@pytest.mark.parametrize("align", ["AttributeConsistency", "NearestDescriptionKL"])
def test_language_tie_alone_moves_the_resnet_backbone(align):
    """With every HVC weight at 0, one optimiser step on the alignment term changes the
    backbone's weights (the reference code's .item() made this impossible)."""
    from functools import partial

    import hlss.losses as losses
    from hlss.models.backbones import build_backbone
    from hlss.models.dual_encoder import DualEncoder

    torch.manual_seed(0)
    banks = {
        lv: torch.nn.functional.normalize(torch.randn(a, 16), dim=1)
        for lv, a in (("patch", 5), ("slide", 4), ("patient", 3))
    }
    model = DualEncoder(build_backbone("resnet18"), 16, banks, head="text", center_text=True)
    objective = losses.HLSSObjective(
        losses.HierarchicalVisualContrast(weights={"patch": 0.0, "slide": 0.0, "patient": 0.0}),
        align=getattr(losses, align)(),
    )
    module = HLSSModule(model, objective, optimizer=partial(adamw_warmup_cosine, lr=1e-2))
    batch = fake_batch(P=2, S=2, N=2, T=2, size=32)
    out = module.compute_losses(batch)
    assert out["hvc"].item() == 0.0 and out["align"].requires_grad
    out["loss"].backward()
    conv = (
        model.backbone.conv1.weight
        if hasattr(model.backbone, "conv1")
        else next(model.backbone.parameters())
    )
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    before = conv.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not torch.equal(before, conv.detach())
    # the frozen text prototypes are buffers: untouched
    assert all(not t.requires_grad for t in model.text_embeddings.values())
