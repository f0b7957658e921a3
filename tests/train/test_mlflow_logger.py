"""``BufferedMLFlowLogger``: a step's metrics reach MLflow in batches, and none are lost."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from hlss.config import check_targets
from hlss.errors import ConfigError
from hlss.train.mlflow_logger import BufferedMLFlowLogger, _flush_open_loggers


@pytest.fixture
def make(tmp_path):
    def make(**kwargs) -> BufferedMLFlowLogger:
        return BufferedMLFlowLogger(
            experiment_name="t", tracking_uri=f"sqlite:///{tmp_path}/m.db", **kwargs
        )

    return make


def steps_of(logger: BufferedMLFlowLogger, key: str) -> list[int]:
    client = MlflowClient(logger._tracking_uri)
    return sorted(m.step for m in client.get_metric_history(logger.run_id, key))


def log_steps(logger: BufferedMLFlowLogger, steps) -> None:
    """As Lightning calls it: the losses, then the learning rate, per step."""
    for step in steps:
        logger.log_metrics({"train/loss": 1.0 / step, "train/hvc_patch": 2.0}, step=step)
        logger.log_metrics({"lr-AdamW": 1e-3 * step}, step=step)


def test_steps_are_written_in_batches_and_all_at_the_end(make):
    logger = make(flush_every_n_steps=3, flush_every_s=3600)
    log_steps(logger, range(1, 5))
    assert steps_of(logger, "train/loss") == [1, 2, 3]  # written with step 3's losses
    assert steps_of(logger, "lr-AdamW") == [1, 2]  # step 3's rate and step 4 wait
    logger.finalize("success")
    assert steps_of(logger, "train/loss") == [1, 2, 3, 4]
    assert steps_of(logger, "lr-AdamW") == [1, 2, 3, 4]
    client = MlflowClient(logger._tracking_uri)
    history = {m.step: m.value for m in client.get_metric_history(logger.run_id, "train/loss")}
    assert history == {s: pytest.approx(1.0 / s) for s in range(1, 5)}
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def _finalized_while_handling(logger: BufferedMLFlowLogger, error: BaseException) -> str:
    """Finalize as Lightning does when ``error`` ends a fit (inside its ``except``); the run's
    status."""
    try:
        raise error
    except BaseException:
        logger.finalize("failed")
    return MlflowClient(logger._tracking_uri).get_run(logger.run_id).info.status


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (SystemExit(143), "KILLED"),  # Preemption's stop on SIGTERM
        (KeyboardInterrupt(), "KILLED"),  # a second Ctrl-C
        (RuntimeError("non-finite loss"), "FAILED"),
    ],
)
def test_a_run_stopped_from_outside_ends_killed_an_error_failed(make, error, status):
    logger = make()
    log_steps(logger, [1])
    assert _finalized_while_handling(logger, error) == status
    assert steps_of(logger, "train/loss") == [1]  # written either way


def test_failed_outside_an_exception_stays_failed(make):
    logger = make()
    log_steps(logger, [1])
    logger.finalize("failed")
    assert MlflowClient(logger._tracking_uri).get_run(logger.run_id).info.status == "FAILED"


def test_one_step_writes_every_step(make):
    logger = make(flush_every_n_steps=1)
    log_steps(logger, [1])
    assert steps_of(logger, "lr-AdamW") == [1]
    assert logger._pending == []


def test_old_metrics_are_written_after_flush_every_s(make):
    logger = make(flush_every_n_steps=1000, flush_every_s=0.05)
    log_steps(logger, [1])
    assert steps_of(logger, "train/loss") == []
    time.sleep(0.1)
    log_steps(logger, [2])
    assert steps_of(logger, "train/loss") == [1, 2]


def test_a_checkpoint_and_interpreter_exit_write_the_buffer(make):
    logger = make(flush_every_n_steps=1000, flush_every_s=3600)
    log_steps(logger, [1, 2])
    logger.after_save_checkpoint(object())
    assert steps_of(logger, "train/loss") == [1, 2]
    log_steps(logger, [3])
    _flush_open_loggers()  # what runs at interpreter exit
    assert steps_of(logger, "train/loss") == [1, 2, 3]


def test_metric_names_mlflow_refuses_are_cleaned_with_one_warning(make, caplog):
    logger = make(flush_every_n_steps=1)
    with caplog.at_level("WARNING", logger="hlss.train.mlflow_logger"):
        logger.log_metrics({"val(acc)": 0.5, "note": "text"}, step=1)
        logger.log_metrics({"val(acc)": 0.6}, step=2)
    assert steps_of(logger, "valacc") == [1, 2]
    assert sum("logged as 'valacc'" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flush_every_n_steps": 0}, "flush_every_n_steps must be >= 1"),
        ({"flush_every_s": 0}, "flush_every_s must be > 0"),
    ],
)
def test_bad_flush_settings_raise(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_config_check_knows_mlflow_loggers_keys_and_its_own():
    from omegaconf import OmegaConf

    target = "hlss.train.mlflow_logger.BufferedMLFlowLogger"
    good = {"_target_": target, "experiment_name": "x", "flush_every_n_steps": 5}
    check_targets(OmegaConf.create({"logger": good}))
    with pytest.raises(ConfigError, match=r"logger\.experimnt_name: unknown key"):
        check_targets(OmegaConf.create({"logger": {"_target_": target, "experimnt_name": "x"}}))
    with pytest.raises(ConfigError, match=r"logger\.flush_every_n_steps: expected an integer"):
        check_targets(OmegaConf.create({"logger": {**good, "flush_every_n_steps": "ten"}}))
