"""The rule a hierarchy batch must meet, shared by the data module and ``hlss-train``'s
pre-flight checks (pure Python: the pre-flight runs before torch is imported)."""

from __future__ import annotations

import math

from hlss.errors import ConfigError, DataError


def check_batch(
    train_patients: int, patients: int, drop_last: bool = True, processes: int = 1, name: str = ""
) -> None:
    """Refuse a batch of ``patients`` patients per process that the train split cannot fill.

    The sampler deals the ``train_patients`` patients out to ``processes`` processes (padding by
    wrap-around), so each process sees ``ceil(train_patients / processes)`` per epoch; with
    ``drop_last`` a process with fewer than ``patients`` would never get a full batch. Slides and
    patches wrap around within a patient, so only patients count.

    Raises:
        DataError: the train split has no patients.
        ConfigError: the batch cannot be filled; the line names ``loader.patients``.
    """
    label = f"{name}: " if name else ""
    if train_patients < 1:
        raise DataError(f"{label}the train split has no patches")
    per_process = math.ceil(train_patients / max(1, int(processes)))
    if drop_last and per_process < int(patients):
        across = f" ({processes} processes share them)" if processes > 1 else ""
        raise ConfigError(
            f"{label}{train_patients} train patients{across} cannot fill a batch of "
            f"{patients} patients per process; lower loader.patients to {per_process} or less"
        )
