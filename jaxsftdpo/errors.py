"""The endings a command reports as one line on stderr and an exit status (`cli.run_cli`).

`UserError` (exit 2) is input the user can fix; `StorageError` (exit 1) the workdir's storage
failing under a run; `Diverged` (exit 3) training that produced a non-finite or exploding loss;
`Stopped` (128 + the signal, as a shell reports a process the signal killed) a run that
SIGTERM or SIGINT stopped after its checkpoint.
"""


class ExitError(Exception):
    """An ending the CLIs print as `{prefix}: message` and exit with `exit_status`."""

    exit_status = 1
    prefix = "error"


class UserError(ExitError):
    """Input the user can fix: the message says what is wrong and how to fix it."""

    exit_status = 2


class StorageError(ExitError):
    """The workdir's storage failed while a run wrote to it (e.g. a full disk)."""


class Diverged(ExitError):
    """Training produced a non-finite loss or gradient norm, or a loss past `max_loss`."""

    exit_status = 3


class Stopped(ExitError):
    """A run stopped by a signal after checkpointing; rerunning the command resumes it."""

    prefix = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


def first_line(error: BaseException | str, limit: int | None = None) -> str:
    """The first line of an error's message (cut to `limit` characters), or the name of its
    type when the message is empty: for a one-line report that quotes a library's error."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """The whole message of an error on one line (each run of white space, line breaks
    included, one space), cut to `limit` characters."""
    return " ".join(str(error).split())[:limit]
