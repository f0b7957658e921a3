"""MLflow tracking shared by training and evaluation.

Training logs through Lightning's ``MLFlowLogger`` (built from ``conf/logger``); evaluation logs
its per-level metrics and output files into the same run with :class:`EvalSink`. Both go through
:func:`prepare_tracking_uri`, so a ``sqlite:///`` store works in a folder that does not exist yet.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Iterable, Mapping

from hlss.levels import LEVELS

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"


def prepare_tracking_uri(uri: str) -> str:
    """Make a tracking URI usable: for a ``sqlite:///<path>`` store, create the folder of
    ``<path>`` (relative paths: relative to the working directory); any other URI is untouched.

    Returns:
        ``uri`` as a string, unchanged.
    """
    uri = str(uri)
    if uri.startswith(SQLITE_PREFIX):
        os.makedirs(os.path.dirname(uri[len(SQLITE_PREFIX) :]) or ".", exist_ok=True)
    return uri


def artifact_location(uri: str) -> str | None:
    """Where the artifacts of a new experiment go: beside a ``sqlite:///<dir>/<db>`` store, in
    ``<dir>/mlartifacts`` (MLflow's default would be ``./mlruns`` under the working directory);
    ``None`` (the server decides) for any other store."""
    uri = str(uri)
    if uri.startswith(SQLITE_PREFIX):
        folder = os.path.dirname(os.path.abspath(uri[len(SQLITE_PREFIX) :]))
        return os.path.join(folder, "mlartifacts")
    return None


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/outputs/mlruns.db``: the store ``hlss-train`` uses by default."""
    return SQLITE_PREFIX + os.path.join(os.path.abspath("outputs"), "mlruns.db")


class EvalSink:
    """Logs evaluation metrics and files to an MLflow run.

    The run is the training run ``run_id`` when the store at ``tracking_uri`` has it; otherwise
    (no id, or an id this store does not know: a warning) a new run named ``eval <description>``
    is created in ``experiment`` (created when missing) and terminated by :meth:`close`.

    Attributes:
        uri: the tracking URI in use.
        run_id: the run logged to.
        new_run: ``True`` when this sink created the run.
    """

    def __init__(
        self, tracking_uri: str, run_id: str | None, experiment: str, description: str
    ) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = prepare_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id, self.new_run = None, False
        if run_id:
            try:
                self.run_id = self.client.get_run(run_id).info.run_id
            except mlflow.exceptions.MlflowException:
                log.warning(
                    "MLflow run %s not found in %s; logging to a new eval run", run_id, self.uri
                )
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(str(experiment))
            exp_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(
                    str(experiment), artifact_location=artifact_location(self.uri)
                )
            )
            run = self.client.create_run(
                exp_id, tags={"hlss.eval_of": description}, run_name=f"eval {description}"
            )
            self.run_id, self.new_run = run.info.run_id, True

    def log_levels(self, metrics: Mapping, step: int, prefix: str, keys: Iterable[str]) -> None:
        """Log ``metrics[level][key]`` as ``<prefix>/<level>_<key>`` at ``step``, for every level
        of :data:`hlss.levels.LEVELS` and every key of ``keys`` (one batch).

        Raises:
            KeyError: a level or key is missing from ``metrics``.
        """
        from mlflow.entities import Metric

        stamp = int(_dt.datetime.now().timestamp() * 1000)
        batch = [
            Metric(f"{prefix}/{level}_{key}", float(metrics[level][key]), stamp, int(step))
            for level in LEVELS
            for key in keys
        ]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_settings(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        """Log ``params`` and set ``tags`` (a later evaluation overwrites them) in one batch.

        Params of a run cannot change once set: a key the run already has is not logged again
        (a different value only warns, naming the key and both values).
        """
        from mlflow.entities import Param, RunTag

        known = self.client.get_run(self.run_id).data.params
        for key, value in params.items():
            if key in known and known[key] != str(value):
                log.warning("MLflow param %s stays %r (not %r)", key, known[key], str(value))
        self.client.log_batch(
            self.run_id,
            params=[Param(k, str(v)) for k, v in params.items() if k not in known],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def log_folder(self, folder: str) -> None:
        """Upload ``folder`` as the run's artifacts under ``eval/<folder name>``."""
        self.client.log_artifacts(
            self.run_id, folder, artifact_path=f"eval/{os.path.basename(folder)}"
        )

    def close(self) -> None:
        """Terminate the run if this sink created it (a training run is left as it is)."""
        if self.new_run:
            self.client.set_terminated(self.run_id)
