"""The base of every error a user can fix: the CLI prints it in one line (the traceback only with -v)."""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input, files or machine, not in pistill; the message names it and the fix.

    `exit_code` is the CLI's exit status: 2 for a bad command line or recipe, 1 for everything found later.
    Anything that is not a UserError is a bug and keeps its traceback.
    """

    exit_code = 1


class UsageError(UserError, ValueError):
    """A bad command-line argument (exit 2)."""

    exit_code = 2


class InputError(UserError, ValueError):
    """A file, folder or value that a stage cannot use, found while it runs (a ValueError, as before)."""


class OutputError(UserError):
    """An output folder that pistill may not write or replace; nothing was written."""
