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
