"""``compile``: ``torch.compile`` for the model's forward and the objective when training starts
(a GPU speed-up)."""

from __future__ import annotations

import pytest

from hlss.checkpoints import load_checkpoint_file
from hlss.errors import HLSSError
from hlss.train.compiling import compile_arguments
from tests.train.helpers import TINY, run_train, summaries
from tests.train.test_channels_last import losses_and_gradients_agree, module

EAGER = {"backend": "eager"}  # dynamo traces the backbone; no code generation (seconds on a CPU)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (False, None),
        (None, None),
        (True, {}),
        ({"mode": "max-autotune"}, {"mode": "max-autotune"}),
        ({"backend": "eager", "fullgraph": True}, {"backend": "eager", "fullgraph": True}),
    ],
)
def test_compile_setting_becomes_torch_compile_arguments(value, expected):
    assert compile_arguments(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("yes", "compile must be true, false or a mapping of torch.compile arguments, got 'yes'"),
        (1, "compile must be true, false or a mapping"),
        ({"mod": "default"}, "compile: unknown torch.compile argument(s) mod (known: mode,"),
        ({"mode": "fastest"}, "compile: torch.compile refuses {'mode': 'fastest'}: Unrecognized"),
        ({"backend": "nope"}, "compile: torch.compile refuses {'backend': 'nope'}"),
        ({"options": {"no_such": 1}}, "Unexpected optimization option no_such"),
    ],
)
def test_bad_compile_setting_is_one_line(value, message):
    with pytest.raises(HLSSError) as err:
        compile_arguments(value)
    assert message in str(err.value)
    assert "\n" not in str(err.value) and "known options are" not in str(err.value)


def test_model_and_objective_are_compiled_in_place_for_fit_only():
    plain, compiled = module(False), module(False, compile=EAGER)
    compiled.setup("validate")
    assert compiled.model._compiled_call_impl is None  # not for evaluation
    assert compiled.objective._compiled_call_impl is None
    plain.setup("fit")
    compiled.setup("fit")
    assert plain.model._compiled_call_impl is None
    assert plain.objective._compiled_call_impl is None
    assert compiled.model._compiled_call_impl is not None
    assert compiled.objective._compiled_call_impl is not None
    compiled.setup("fit")  # a second setup (another fit of the same module) compiles nothing more
    assert compiled.model._compiled_call_impl is not None
    # compiled in place: the same weight names, so checkpoints do not depend on it
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())


def test_compiled_step_gives_the_same_losses_and_gradients():
    plain, compiled = module(False), module(False, compile=EAGER)
    compiled.model.load_state_dict(plain.model.state_dict())
    losses_and_gradients_agree(plain, compiled, loss_atol=1e-6, grad_rel=1e-6)


def test_training_with_compile_writes_plain_checkpoints(tmp_path, monkeypatch):
    """As a user runs it, default (MLflow) logger on: the run trains and its checkpoint holds
    the backbone's plain weight names."""
    monkeypatch.chdir(tmp_path)
    run_train(*TINY, "compile={backend:eager}")
    (summary,) = summaries(str(tmp_path / "outputs"))
    checkpoint = load_checkpoint_file(summary["last_checkpoint"])
    assert checkpoint["global_step"] == 2
    assert checkpoint["hlss"]["config"]["compile"] == {"backend": "eager"}
    keys = list(checkpoint["state_dict"])
    assert "model.backbone.conv1.weight" in keys
    assert not any("_orig_mod" in k for k in keys)
