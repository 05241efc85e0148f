"""Exit codes that scripts can rely on, and the errors that carry them."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

OK = 0
FAILED = 1  # the operation failed: a gRPC error, a test message not sent, a PII API test with an error
USAGE = 2  # bad flags, an invalid file (the field is named) or a request the server refused as invalid
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT (and SIGTERM where a call is cancelled as for it)

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    the operation failed: the server could not be reached or answered with an
       error (NOT_FOUND, FAILED_PRECONDITION, UNAVAILABLE ...), a test message was
       not sent, a PII API test returned an error, an OAuth config was saved FAILED,
       or the output could not be written (a full disk, standard output closed)
  2    usage or validation error: bad flags or addresses, an invalid YAML file (the
       message names the file, the document and the field), or a request the server
       refused as INVALID_ARGUMENT (its field violations are printed)
  130  interrupted (Ctrl-C; SIGTERM too for dispatch and events)"""


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


class OutputFailed(CliError):
    """Writing the command's output failed (a full disk, a device error): exit 1, naming where it went."""


class GuardedOutput:
    """An output stream whose failing write, flush or close (ENOSPC, EIO, EFBIG ...) raises OutputFailed naming
    `where` rather than an OSError traceback. A reader gone (BrokenPipeError) is left to its own handling: it is
    no failure (`| head`). Once failed, closing it drops what is still buffered."""

    def __init__(self, stream: IO[str], where: str) -> None:
        self._stream = stream
        self.where = where  # "standard output", "--out results.jsonl"
        self.failed = False

    def write(self, text: str) -> int:
        return self._guarded(self._stream.write, text)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def close(self) -> None:
        if self.failed:
            with contextlib.suppress(OSError):
                self._stream.close()
            return
        self._guarded(self._stream.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _guarded(self, action: Callable[..., Any], *args: Any) -> Any:
        try:
            return action(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.failed = True
            raise OutputFailed(f"cannot write to {self.where}: {exc.strerror or type(exc).__name__}") from None


class ClosedStdout(io.TextIOBase):
    """Standard output closed before the command began (`>&-`), where Python leaves sys.stdout None and print()
    drops everything without a word: what is written here is noted instead, so that the command, having done
    its work (every config saved), exits 1 saying its output was lost rather than 0 as if it had been read."""

    lost = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.lost = self.lost or bool(text)
        return len(text)


STDOUT_CLOSED = "standard output is closed (>&-)"
STDIN_CLOSED = "- reads standard input, which is closed (<&-)"


def stdout_closed() -> bool:
    return isinstance(sys.stdout, ClosedStdout)


def stdin_closed() -> bool:
    return sys.stdin is None


@contextlib.contextmanager
def guarded_stdout() -> Iterator[None]:
    """Standard output guarded for a command: a write that fails (a full disk) raises OutputFailed naming it
    rather than an OSError traceback, and one to a standard output closed before the command began
    (`>&-`) is kept as lost (`stdout_lost`). What is still buffered after a failure is dropped, or it would
    fail again as the interpreter exits."""
    given = sys.stdout
    sys.stdout = ClosedStdout() if given is None else GuardedOutput(given, "standard output")
    try:
        yield
    finally:
        if isinstance(sys.stdout, GuardedOutput) and sys.stdout.failed:
            with contextlib.suppress(OSError, ValueError):  # a stream without a descriptor has nothing to flush
                discard_stdout()
        sys.stdout = given


def stdout_lost() -> bool:
    """Whether the command printed to a standard output closed before it began."""
    return isinstance(sys.stdout, ClosedStdout) and sys.stdout.lost
