"""The exceptions every layer of mlla-mm raises (a leaf module: it imports nothing of the package).

The command-line tools (:mod:`mlla_mm.cli`) turn them into one ``error:`` line and an exit code:

- :class:`UsageError`, :class:`DataNotFoundError` (and its subclasses), :class:`CheckpointError`: a problem the
  user can fix; exit code 2.
- :class:`NonFiniteLossError`: training stopped on a NaN/inf loss; exit code 1.
- :class:`TrainingInterrupted`: training stopped on a signal after writing a resumable checkpoint; 128 + N.
- :class:`TrainingAborted`: Ctrl-C twice during training; exit code 130.
"""
from __future__ import annotations


class UsageError(Exception):
    """A problem the user can fix (bad path, bad config); shown as one line, exit code 2."""


class DataNotFoundError(FileNotFoundError):
    """A data set the config needs is not on disk; the message says what to do."""


class BadAnnotationError(DataNotFoundError):
    """An annotation file is not valid, is inconsistent, or names images that are not on disk."""


class BadImageError(BadAnnotationError):
    """Images (or label maps) of a data set cannot be read or have another size than stated."""


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file."""


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights about to be saved) became NaN or infinite."""


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after writing a resumable checkpoint.

    A ``SystemExit`` whose ``code`` is 128 + the signal number (143 for
    SIGTERM, 130 for SIGINT): uncaught, the process exits with it quietly.
    """


class TrainingAborted(KeyboardInterrupt):
    """A second SIGINT (Ctrl-C twice): training stopped at once, without the checkpoint of the first.

    A ``KeyboardInterrupt`` (so no ``except Exception`` swallows it, and
    :func:`mlla_mm.utils.io.atomic_write` discards a half-written file) that
    says where ``--resume`` continues from; ``code`` is 130.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (KeyError's repr quotes removed, no ``[Errno N]`` prefix).

    Library code uses it to quote a caught error inside its own message; the tools print ``error: `` + it.
    """
    if isinstance(err, OSError) and err.strerror:  # no '[Errno N]' prefix
        text = err.strerror if not err.filename or str(err.filename) in err.strerror \
            else f'{err.strerror}: {err.filename}'
    else:
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return ' '.join(str(text).split()) or type(err).__name__


__all__ = ['UsageError', 'DataNotFoundError', 'BadAnnotationError', 'BadImageError', 'CheckpointError',
           'NonFiniteLossError', 'TrainingInterrupted', 'TrainingAborted', 'one_line']
