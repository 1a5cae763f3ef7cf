"""Command-line helpers: argparse types (MLproject does not validate int/float parameters), the quiet console and
:func:`run_cli` (one-line errors, exit status 2)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Iterable


log = logging.getLogger("mlflow_projects.common")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see --help)`` and exit status 2 (argparse prints
    its whole usage block first, which buries the message)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def entry_parser(name: str, doc: str | None, **kwargs) -> ArgumentParser:
    """The parser of entry point ``name``: ``prog`` is ``name`` (the name errors start with), the description
    is the first paragraph of the module docstring, errors are one line (:class:`ArgumentParser`)."""
    first = " ".join((doc or "").strip().split("\n\n")[0].split())
    return ArgumentParser(prog=name, description=first, **kwargs)


# ---- argparse types: MLproject does not validate int/float parameters, so we do. -------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0.0 <= value < float("inf"):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0.0 < value < float("inf"):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_at_least(minimum: int, what: str = "an integer"):
    """argparse type accepting an integer >= ``minimum``; the error names the minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}")
        return value

    return parse


def unit_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {path.resolve()}")
    return path.resolve()


def choice_of(valid: Iterable[str], what: str):
    """argparse type accepting one of ``valid``; the error lists them."""
    options = sorted(valid)

    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; valid: {', '.join(options)}")
        return text

    return parse


# ---- command line --------------------------------------------------------------------------------
class _DropKnownNoise(logging.Filter):
    """Drops third-party log records that say nothing about this project's runs:

    - MLflow's note that a ``python_model`` object is pickled with CloudPickle (every pyfunc here is one,
      on purpose: the wrappers are this package's classes), and that no signature was inferred from the
      ``np.ndarray`` type hint (the CLIP pyfunc takes image arrays or texts, so it has none);
    - transformers' load report when its only rows are the BERT pooler weights the offline MiniLM
      checkpoint carries and a sentence encoder does not use (any other missing or unexpected key
      is still reported).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Passing a Python object as `python_model`"):
            return False
        if msg.startswith("Failed to infer model signature: Type hint") and "input example is not provided" in msg:
            return False  # the CLIP pyfunc has no signature on purpose: it takes image arrays or texts
        if "LOAD REPORT" in msg:
            rows = [ln for ln in msg.splitlines() if "|" in ln and not ln.lstrip().startswith(("Key", "-"))]
            keys = [ln.split("|")[0].strip() for ln in rows]
            if keys and all(k.startswith("pooler.") for k in keys) and all("UNEXPECTED" in ln for ln in rows):
                return False
        return True


_NOISE_FILTER = _DropKnownNoise()


def quiet_third_party() -> None:
    """Silence known, irrelevant third-party log records (idempotent): see :class:`_DropKnownNoise`."""
    for name in ("mlflow.pyfunc", "transformers.modeling_utils"):
        logging.getLogger(name).addFilter(_NOISE_FILTER)


def quiet_console() -> None:
    """Log lines to stderr at INFO (what every entry point prints), without third-party noise
    (:func:`quiet_third_party`); progress bars of MLflow and Hugging Face off when stderr is not a
    terminal."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not show_progress():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def show_progress() -> bool:
    """Whether progress bars belong on the console: only when stderr is a terminal (in a log file or a
    test's captured output a bar leaves lines of debris)."""
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def run_cli(main, prog: str, argv=None) -> int:
    """Run an entry point's ``main(argv)`` for the command line: a bad input (``ValueError`` naming the
    bad value, a missing file, an unknown registry reference) ends with one line ``prog: error: ...`` and
    exit status 2 instead of a traceback (``CXR_TRACEBACK=1`` shows it). Returns the exit status."""
    import sys

    try:
        status = main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if os.environ.get("CXR_TRACEBACK"):
            raise
        log.debug("%s failed", prog, exc_info=True)
        sys.stderr.write(f"{prog}: error: {str(exc).strip()}\n")
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0

