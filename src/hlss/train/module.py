"""The LightningModule: hierarchy batch -> dual encoder -> multi-level HLSS objective."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import lightning as L
import torch

from hlss.errors import HLSSError
from hlss.train.compiling import compile_arguments


class NonFiniteLossError(HLSSError):
    """The loss became NaN or infinite; training stops, the last good checkpoint stays."""


def hierarchy_ids(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-image ids at each level for a batch ``[P, S, N, T, ...]``, flattened to ``[P*S*N*T]``.

    Patch ids are table rows, slide ids global slide indices, patient ids patient indices, so
    equal ids mean the same patch / slide / patient even across ranks and after wrap-around.
    """
    P, S, N, T = batch["image"].shape[:4]
    shape = (P, S, N, T)
    return {
        "patch": batch["patch"].view(P, S, N, 1).expand(shape).reshape(-1),
        "slide": batch["slide"].view(P, S, 1, 1).expand(shape).reshape(-1),
        "patient": batch["patient"].view(P, 1, 1, 1).expand(shape).reshape(-1),
    }


class HLSSModule(L.LightningModule):
    """Trains a :class:`hlss.models.dual_encoder.DualEncoder` with an HLSS/HiDisc objective.

    Args:
        model: the dual encoder (backbone, projection, heads, frozen text embeddings).
        objective: :class:`hlss.losses.HLSSObjective` (or anything with the same call).
        optimizer: ``(params, total_steps) -> (optimizer, scheduler)``, e.g. the ``_partial_``
            :func:`hlss.train.optim.adamw_warmup_cosine` of the ``optimizer`` config.
        gather: all-gather embeddings and ids across processes (with gradients) so that every
            rank's images are negatives for every other rank's anchors.
        run_config: the resolved run config (plain containers). Every checkpoint carries it at
            ``checkpoint["hlss"]["config"]``, beside the MLflow run id, so a lone checkpoint can
            be evaluated or resumed anywhere.
        channels_last: ``"auto"`` (on a CUDA device), ``True`` or ``False``: keep the model's
            convolution weights and the image batch in channels-last memory order, which the
            GPU's tensor-core convolutions run fastest in (bf16/fp16). Values are unchanged;
            checkpoints stay loadable either way.
        compile: compile the training step's network with ``torch.compile`` when training
            starts: ``False`` (default), ``True`` (torch's defaults) or a mapping of
            ``torch.compile``'s keyword arguments (``mode``, ``backend``, ``fullgraph``,
            ``dynamic``, ``options``). Two parts are compiled, each in place
            (:meth:`torch.nn.Module.compile`): the model's forward (backbone, projection and heads)
            and the objective (its contrastive and language terms, one graph with no host sync).
            Between them stays the all-gather of a multi-GPU run. Weight names, and every
            checkpoint, stay as without it. The first step then takes the compile time (~45 s for
            CLIP RN50 on an H200), every later one far fewer kernel launches.

    Raises:
        HLSSError: ``channels_last`` or ``compile`` is not one of the values above, or names a
            ``torch.compile`` mode or backend that torch does not know.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: torch.nn.Module,
        optimizer: Callable | None = None,
        gather: bool = True,
        run_config: Mapping | None = None,
        channels_last: bool | str = "auto",
        compile: bool | Mapping = False,
    ):
        super().__init__()
        self.run_config = dict(run_config) if run_config is not None else None
        self.model = model
        self.objective = objective
        self.optimizer_factory = optimizer
        self.gather = gather
        self.bad_files_seen = 0
        if channels_last not in ("auto", True, False):
            raise HLSSError(f"channels_last must be auto, true or false, got {channels_last!r}")
        self.channels_last = channels_last
        self._memory_format = torch.contiguous_format
        self.compile_kwargs = compile_arguments(compile)
        self._compiled = False

    def _compile(self) -> None:
        if self.compile_kwargs is None or self._compiled:
            return
        self.model.compile(**self.compile_kwargs)
        self.objective.compile(**self.compile_kwargs)
        self._compiled = True

    def setup(self, stage: str) -> None:
        # Before the strategy moves and wraps the model (DDP registers the weights' layout).
        wanted = self.channels_last
        if wanted == "auto":
            trainer = self._trainer
            device = trainer.strategy.root_device if trainer is not None else self.device
            wanted = device.type == "cuda"
        if wanted:
            self._memory_format = torch.channels_last
            self.model.to(memory_format=torch.channels_last)
        if stage == "fit":
            self._compile()

    def forward(self, images: torch.Tensor) -> dict:
        return self.model(images)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer  # None outside a Trainer (``self.trainer`` would raise)
        if not self.gather or trainer is None or trainer.world_size <= 1:
            return tensor
        return self.all_gather(tensor, sync_grads=True).flatten(0, 1)

    def compute_losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward a hierarchy batch and evaluate the objective (no logging, no checks)."""
        images = batch["image"]
        flat = images.reshape(-1, *images.shape[4:])
        if self._memory_format is not torch.contiguous_format:
            flat = flat.contiguous(memory_format=self._memory_format)
        out = self.model(flat)
        ids = {level: self._gather(v) for level, v in hierarchy_ids(batch).items()}
        heads = out["heads"]
        if isinstance(heads, Mapping):
            heads = {level: self._gather(h) for level, h in heads.items()}
        else:
            heads = self._gather(heads)
        text_space = out.get("text_space")
        if text_space is not None:
            text_space = self._gather(text_space)
        text = getattr(self.model, "text_embeddings", None)
        return self.objective(heads, ids, text_embeddings=text, text_space=text_space)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        loss = losses["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"non-finite loss {loss.item()} at step {self.global_step}; stopping "
                "(the last good checkpoint is kept; lower optimizer.lr or check the data)"
            )
        size = batch["image"].shape[0]
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in losses.items()},
            on_step=True,
            prog_bar=False,
            batch_size=size,
            sync_dist=False,
        )
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=size)
        bad = int(batch["bad"].sum()) if "bad" in batch else 0
        if bad:
            self.bad_files_seen += bad
            self.log("train/bad_files", float(self.bad_files_seen), batch_size=size)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainer = self._trainer
        callback = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
        checkpoint["hlss"] = {
            "config": self.run_config,
            "mlflow_run_id": getattr(self.logger, "run_id", None) if trainer is not None else None,
            "checkpoint_dir": getattr(callback, "dirpath", None),
        }

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise HLSSError("no optimizer configured")
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise HLSSError("set trainer.max_steps (or max_epochs) so the schedule has a length")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer, scheduler = self.optimizer_factory(params, total_steps=int(total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
