"""The MLflow tracking adapter shared by training and evaluation (sqlite stores in tmp folders)."""

from __future__ import annotations

import logging
import os
import sqlite3

import pytest
from mlflow.tracking import MlflowClient

from hlss.levels import LEVELS
from hlss.tracking import EvalSink, default_tracking_uri, prepare_tracking_uri

KEYS = ("acc", "mca")


def _metrics(offset: float = 0.0) -> dict:
    return {lv: {"acc": 0.5 + offset, "mca": 0.25 + offset, "other": 9.0} for lv in LEVELS}


def test_prepare_tracking_uri_creates_the_sqlite_folder(tmp_path, monkeypatch):
    db = tmp_path / "deep" / "er" / "mlruns.db"
    uri = f"sqlite:///{db}"
    assert prepare_tracking_uri(uri) == uri
    assert db.parent.is_dir() and not db.exists()  # the folder, not the store
    monkeypatch.chdir(tmp_path)
    assert prepare_tracking_uri("sqlite:///rel/x.db") == "sqlite:///rel/x.db"
    assert (tmp_path / "rel").is_dir()
    # other stores are left alone
    assert prepare_tracking_uri(f"file://{tmp_path / 'nope'}") == f"file://{tmp_path / 'nope'}"
    assert not (tmp_path / "nope").exists()
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'outputs' / 'mlruns.db'}"


def _store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"


def test_sink_logs_into_an_existing_run(tmp_path):
    uri = _store(tmp_path)
    prepare_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("train")
    run_id = client.create_run(exp).info.run_id
    out = tmp_path / "ev"
    out.mkdir()
    (out / "metrics.json").write_text("{}")

    sink = EvalSink(uri, run_id, "hlss-eval", "checkpoint x.ckpt")
    assert sink.run_id == run_id and not sink.new_run and sink.uri == uri
    sink.log_levels(_metrics(), step=1, prefix="eval", keys=KEYS)
    sink.log_levels(_metrics(0.1), step=2, prefix="eval", keys=KEYS)
    sink.log_folder(str(out))
    sink.close()

    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # a training run is not terminated by eval
    assert set(run.data.metrics) == {f"eval/{lv}_{k}" for lv in LEVELS for k in KEYS}
    history = client.get_metric_history(run_id, "eval/patient_acc")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, 0.5), (2, 0.6)]
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/ev"]
    assert client.get_experiment_by_name("hlss-eval") is None  # no eval experiment needed


@pytest.mark.parametrize("run_id", [None, "0123456789abcdef0123456789abcdef"])
def test_sink_opens_a_new_run_when_the_training_run_is_unknown(tmp_path, caplog, run_id):
    uri = _store(tmp_path)  # its folder does not exist yet
    with caplog.at_level(logging.WARNING, logger="hlss.tracking"):
        sink = EvalSink(uri, run_id, "hlss-eval", "untrained x.ckpt")
    assert os.path.isfile(tmp_path / "store" / "mlruns.db")
    assert sink.new_run and sink.run_id != run_id
    assert ("not found" in caplog.text) == (run_id is not None)
    sink.log_levels(_metrics(), step=0, prefix="eval_untrained", keys=("acc",))
    sink.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["hlss.eval_of"] == "untrained x.ckpt"
    assert run.info.run_name == "eval untrained x.ckpt"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "hlss-eval"
    assert run.data.metrics == {f"eval_untrained/{lv}_acc": 0.5 for lv in LEVELS}
    # a second sink reuses the experiment
    again = EvalSink(uri, None, "hlss-eval", "y")
    assert client.get_run(again.run_id).info.experiment_id == exp.experiment_id
    with sqlite3.connect(tmp_path / "store" / "mlruns.db") as con:
        assert (
            con.execute("select count(*) from experiments where name='hlss-eval'").fetchone()[0]
            == 1
        )


def test_sink_names_a_missing_metric(tmp_path):
    sink = EvalSink(_store(tmp_path), None, "hlss-eval", "z")
    with pytest.raises(KeyError):
        sink.log_levels({"patch": {"acc": 1.0}}, step=0, prefix="eval", keys=("acc",))


def test_artifact_location_beside_a_sqlite_store(tmp_path):
    from hlss.tracking import artifact_location

    uri = f"sqlite:///{tmp_path}/store/mlruns.db"
    assert artifact_location(uri) == str(tmp_path / "store" / "mlartifacts")
    assert artifact_location("http://server:5000") is None


def test_settings_are_params_once_and_tags_follow_the_latest(tmp_path, caplog):
    uri = _store(tmp_path)
    prepare_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("train")).info.run_id
    client.log_param(run_id, "trainer/max_steps", "10")  # the training run's own params stay
    sink = EvalSink(uri, run_id, "hlss-eval", "x")
    sink.log_settings({"eval.k": "200"}, {"eval.backend": "faiss", "eval.ckpt": "a.ckpt"})
    sink.log_settings({"eval.k": "200", "eval.k20.k": "20"}, {"eval.ckpt": "b.ckpt"})
    with caplog.at_level(logging.WARNING, logger="hlss.tracking"):
        sink.log_settings({"eval.k": "50"}, {})  # a param never changes: warned, not raised
    assert "eval.k" in caplog.text and "'200'" in caplog.text
    data = client.get_run(run_id).data
    assert data.params == {"trainer/max_steps": "10", "eval.k": "200", "eval.k20.k": "20"}
    assert data.tags["eval.ckpt"] == "b.ckpt" and data.tags["eval.backend"] == "faiss"
