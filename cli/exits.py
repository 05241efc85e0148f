"""Exit codes that scripts can rely on, and the errors that carry them."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

OK = 0
FAILED = 1  # the operation failed: a gRPC error, a test message not sent, a PII API test with an error
USAGE = 2  # bad flags, an invalid file (the field is named) or a request the server refused as invalid
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    the operation failed: the server could not be reached or answered with an
       error (NOT_FOUND, FAILED_PRECONDITION, UNAVAILABLE ...), a test message was
       not sent, a PII API test returned an error, an OAuth config was saved FAILED
  2    usage or validation error: bad flags, an invalid YAML file (the message names
       the file, the document and the field), or a request the server refused as
       INVALID_ARGUMENT (its field violations are printed)
  130  interrupted (Ctrl-C)"""


class CliError(Exception):
    """An error to print (to stderr, without a traceback) and exit with."""

    exit_code = FAILED

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CliError):
    """Bad flags or input, found before anything was sent."""

    exit_code = USAGE


@contextlib.contextmanager
def reading(path: str, kind: str) -> Iterator[None]:
    """Opening or reading the file at `path` (a `kind`: "YAML file") fails as a usage error naming it."""
    try:
        yield
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a {kind}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None


def discard_stdout() -> None:
    """Standard output's reader has gone (`| head`): what is left for it is dropped, so that the
    interpreter's own flush at exit does not fail with BrokenPipeError once more."""
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())
