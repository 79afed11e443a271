"""The one exception root of drcaps: every error a user can cause or meet is a :class:`DrcapsError`.

``search/cli.py`` maps each subclass to an exit code and prints its message as one ``error: ...`` line; anything
that is not a ``DrcapsError`` is a bug and shows its traceback. Messages name the bad value (dotted field, flag or
path) and the fix. Defined here, in ``drcapsnet``, because ``drcapsnet`` never imports ``search``.

The input errors (:class:`ConfigError`, :class:`DataError`, :class:`CheckpointError`) are also ``ValueError`` s, so
code that catches a bad value the Python way keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass


class DrcapsError(Exception):
    """Root of every error drcaps raises on purpose: the message is for the user, one line where possible."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration, as data: the dotted ``field`` (``model.units``; relative, e.g.
    ``low``, where the config does not know its own place) and ``message`` (what is wrong, without the field).
    Callers gather and place problems by their field, never by the wording of a message."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ConfigError(DrcapsError, ValueError):
    """A configuration value (file, ``--set``, flag, search space) is wrong; the message names the dotted field.

    ``problems``: every problem found, as data (a config dataclass reports them all at once; the message is the
    first). Empty where the error was raised with a message only."""

    def __init__(self, message: str, problems: tuple[Problem, ...] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)

    def __reduce__(self) -> tuple[type, tuple[str, tuple[Problem, ...]]]:   # pickle/copy (Ray ships errors)
        return type(self), (str(self), self.problems)


def need(problems: list[Problem], cond: bool, field: str, message: str) -> bool:
    """A config's ``problems()`` step: record ``field: message`` in ``problems`` unless ``cond``; return ``cond``
    (checks that build on the value run only when it holds)."""
    if not cond:
        problems.append(Problem(field, message))
    return cond


def raise_problems(problems: list[Problem]) -> None:
    """What a config dataclass's ``__post_init__`` ends with: nothing when ``problems`` is empty, else one
    :class:`ConfigError` carrying them all (its message: the first)."""
    if problems:
        raise ConfigError(str(problems[0]), tuple(problems))


class DataError(DrcapsError, ValueError):
    """The data cannot be read (bad ``data_dir``, corrupt file, failed download)."""


class CheckpointError(DrcapsError, ValueError):
    """A checkpoint path is missing or is not a drcaps checkpoint."""


class TrackingError(DrcapsError):
    """The tracking store cannot be used or does not hold what was asked for."""


class UsageError(DrcapsError):
    """A command-line flag or an output path is wrong (a flag that is not a config field)."""


class DivergedError(DrcapsError):
    """Training produced a NaN or infinite loss. ``epoch`` is the epoch where it happened (1-based)."""

    def __init__(self, epoch: int, what: str) -> None:
        super().__init__(f"diverged at epoch {epoch} ({what}); lower train.lr, or bound the search space")
        self.epoch, self.what = epoch, what

    def __reduce__(self) -> tuple[type, tuple[int, str]]:     # pickle/copy (Ray ships errors between processes)
        return type(self), (self.epoch, self.what)
