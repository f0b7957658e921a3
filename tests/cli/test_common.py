"""The one error path every command shares (`run_hydra_command`)."""

from __future__ import annotations

import pytest

from hlss.cli.common import run_hydra_command
from hlss.errors import ConfigError


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (
            ConfigError("loss.temperature: expected a number, got 'abc'"),
            2,
            "error: loss.temperature",
        ),
    ],
)
def test_interrupt_and_user_error_end_in_one_line(raised, code, line, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def app():
        raise raised

    with pytest.raises(SystemExit) as exc:
        run_hydra_command(app)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line)


# ---------------------------------------------------------------------------------------------
# run_config_command: compose, check, type, run, report


def _cache_command(task, *argv):
    from hlss.cli.common import run_config_command
    from hlss.schemas.cache import CacheConfig

    return run_config_command("hlss-cache", "cache", CacheConfig, task, list(argv))


def test_config_command_passes_the_typed_config_and_returns_the_task_status(monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    from hlss.schemas.cache import CacheConfig

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    seen = []

    def task(args):
        seen.append((args, HydraConfig.get().job.name))
        return 3

    assert _cache_command(task, "dry_run=true", "older_than_days=2") == 3
    ((args, job),) = seen
    assert isinstance(args, CacheConfig) and args.dry_run is True and args.older_than_days == 2
    assert job == "test_common"  # Hydra names the job after the task's module, not common's
    assert _cache_command(lambda args: None) == 0  # no status: 0


def test_config_command_user_errors_are_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    calls = []

    def refusing(args):
        calls.append(args)
        raise ConfigError("clear: expected one of embeddings, all; got 'x'")

    for argv, words in [
        (["clear=x"], "error: clear: expected one of"),  # raised by the task
        (["no_such_key=1"], "error: "),  # refused before the task runs
        (["dry_run=maybe"], "error: dry_run"),  # a wrong type, refused by the schema
    ]:
        with pytest.raises(SystemExit) as exc:
            _cache_command(refusing, *argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(words), (argv, err)
    assert len(calls) == 1


def test_config_command_help_does_not_run_the_task(capsys):
    calls = []
    with pytest.raises(SystemExit) as exc:  # Hydra ends --help itself
        _cache_command(calls.append, "--help")
    assert exc.value.code == 0 and calls == []
    assert capsys.readouterr().out.startswith("hlss-cache")
