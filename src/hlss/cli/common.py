"""Shared plumbing of the console scripts: Hydra apps, their arguments and one-line errors."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hlss.errors import HLSSError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _last_line(err: Exception) -> str:
    """The last non-empty line: errors from data-loader workers arrive with the worker's traceback,
    whose last line starts with the error's qualified class name (dropped here)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return lines[-1].removeprefix(prefix) if len(lines) > 1 else lines[-1]


def report_errors(func: Callable, *args, **kwargs):
    """Run ``func``; a user error (:class:`HLSSError` or a config problem) becomes one stderr line
    (also written to the run's log file, when Hydra keeps one) and exit status 2. For Hydra task
    functions, where Hydra would print its own multi-line report."""
    from omegaconf.errors import OmegaConfBaseException

    from hlss.config import config_message

    try:
        return func(*args, **kwargs)
    except OmegaConfBaseException as err:
        line = config_message(err)
    except HLSSError as err:
        line = _last_line(err)
    print(f"error: {line}", file=sys.stderr)
    log_to_files(f"error: {line}")
    raise SystemExit(EXIT_USER_ERROR) from None


def log_to_files(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` as a record of the ``hlss`` logger to the log files only (the handlers
    that write a file: Hydra's ``<job>.log`` in the run folder), not to the console, where the
    caller has printed it already. Nothing happens when no log file is configured."""
    logger = logging.getLogger("hlss")
    record = logger.makeRecord(logger.name, level, __file__, 0, message, (), None)
    handlers = [*logging.getLogger().handlers, *logger.handlers]
    for handler in dict.fromkeys(handlers):
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)


NOISE = (
    "object_type=",
    "reference_type=",
    "full_key:",
    "Set the environment variable",
    "To append to your config use",
)


def one_line(err: BaseException) -> str:
    """An exception's message (and its cause's, for Hydra's wrapped composition errors) on one
    line: Hydra and OmegaConf spread theirs over several lines (option lists are joined with
    commas, Hydra's config search path is left out)."""
    parts = [str(err)]
    cause = err.__cause__
    if cause is not None and str(cause) and str(cause) not in parts[0]:
        parts.append(str(cause))
    pieces: list[str] = []
    for part in parts:
        listing = False
        for line in part.splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if not line or line.startswith(NOISE):
                continue
            if listing:
                pieces[-1] += (" " if pieces[-1].endswith(":") else ", ") + line
                continue
            pieces.append(line)
            listing = line.endswith(":")
    if not pieces:
        return type(err).__name__
    first = pieces[0]
    if first.startswith("Error merging override ") and len(pieces) > 1:
        # "Error merging override knn.k=abc; Value 'abc' ..." -> "knn.k=abc: Value 'abc' ..."
        return first[len("Error merging override ") :] + ": " + "; ".join(pieces[1:])
    return "; ".join(pieces)


def run_hydra_command(app: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` app so that a bad override or config (a wrong type, an unknown key,
    an unknown option) ends in one ``error:`` line and exit status 2, not Hydra's report.

    Hydra is asked to let exceptions through (``HYDRA_FULL_ERROR=1``) and they are reported
    here; set ``HYDRA_FULL_ERROR=1`` yourself to see the full traceback instead.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hlss.schemas import register_schemas

    user_setting = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_schemas()
    try:
        app()
    except (HydraException, OmegaConfBaseException, HLSSError) as err:
        if user_setting == "1":
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:  # outside training (which saves and exits itself, see preemption)
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:  # a second command in the same process must see the user's setting, not ours
        if user_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_setting


def _module_name(func: Callable) -> str:
    """The importable module ``func`` is defined in (``python -m hlss.cli.x`` runs it as
    ``__main__``; its spec still names it)."""
    name = func.__module__
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else name
    return name


def run_config_command(
    prog: str,
    config_name: str,
    schema: type,
    task: Callable[[Any], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Run a console script whose work is ``task(args)`` on its typed config.

    Composes ``conf/<config_name>.yaml`` with the ``key=value`` overrides of ``argv`` through
    Hydra (``--help`` prints the command's help), holds the result against ``schema``
    (:func:`hlss.config.check_config`: unknown keys, missing values), turns it into a ``schema``
    instance (:func:`hlss.schemas.tools.to_typed`) and calls ``task`` with it. Every user error
    on the way, and any :class:`HLSSError` ``task`` raises, ends in one ``error:`` line on
    stderr and exit status 2 (see :func:`report_errors` and :func:`run_hydra_command`).

    Args:
        prog: the command's name, ``argv[0]`` for Hydra (e.g. ``"hlss-tile"``).
        config_name: the primary config in ``hlss/conf`` (e.g. ``"tile"``).
        schema: its dataclass (e.g. :class:`hlss.schemas.tile.TileConfig`).
        task: does the work and prints; returns the exit status (``None``: 0).
        argv: the arguments (``None``: the process's own).

    Returns:
        ``task``'s status.

    Raises:
        SystemExit: status 2 for a usage error or an :class:`HLSSError` (one line on stderr),
            130 on Ctrl-C, 0 after ``--help`` (Hydra prints the help; ``task`` is not called).
    """
    import hydra

    from hlss.config import check_config
    from hlss.schemas.tools import to_typed

    status: list[int] = []  # a @hydra.main app returns nothing: the task leaves its status here

    def app(cfg) -> None:
        report_errors(check_config, cfg, schema)
        args = report_errors(to_typed, cfg)
        status.append(report_errors(task, args) or 0)

    # Hydra names the job after the module of the function it runs: keep the command's name
    app.__module__ = _module_name(task)
    app = hydra.main(config_path="pkg://hlss.conf", config_name=config_name, version_base="1.3")(
        app
    )
    with command_argv(prog, argv):
        run_hydra_command(app)
    return status[0] if status else 0


class DropMessages(logging.Filter):
    """A logger filter that drops the records whose message starts with one of ``starts``."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# logger -> the messages of it that a user has nothing to do with
CHATTER = {
    # Lightning's adverts for its cloud products, and accelerators that are not there
    "lightning.pytorch.utilities.rank_zero": DropMessages(
        "💡 Tip:", "TPU available: False", "HPU available: False"
    ),
    "lightning.fabric.utilities.rank_zero": DropMessages("💡 Tip:"),
    # the first run into a store creates the experiment: expected, not a warning
    "lightning.pytorch.loggers.mlflow": DropMessages("Experiment with name "),
}

# logger -> the lowest level shown: start-up chatter below it
QUIET_LEVELS = {
    "faiss.loader": logging.WARNING,
    "sentence_transformers": logging.WARNING,
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables..."
    "alembic": logging.WARNING,  # schema migrations of the sqlite store
}

# (message regex, category, module regex) of dependency warnings a user cannot act on
DEPENDENCY_WARNINGS = (
    # torch deprecates LeafSpec; Lightning's own pytree helper still uses it
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
)


def quiet_libraries() -> None:
    """Keep the console to what a user needs: start-up chatter of libraries (FAISS's loader,
    sentence-transformers, MLflow's database set-up) below WARNING, Lightning's tips and the
    MLflow logger's "Experiment ... not found. Creating it." dropped by message, and the
    dependency deprecation warnings of :data:`DEPENDENCY_WARNINGS` ignored (matched by
    message, category and module; every other warning still shows). Safe to call again."""
    import warnings

    for name, level in QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for name, drop in CHATTER.items():
        logging.getLogger(name).addFilter(drop)  # a filter already there is not added twice
    for message, category, module in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def command_argv(prog: str, argv: Sequence[str] | None) -> Iterator[None]:
    """Let a ``@hydra.main`` app (which reads ``sys.argv``) see ``argv`` as its arguments, for
    console-script mains that also take ``argv`` (tests call them in-process); ``None`` keeps
    the process's own arguments."""
    if argv is None:
        yield
        return
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        yield
    finally:
        sys.argv = saved
