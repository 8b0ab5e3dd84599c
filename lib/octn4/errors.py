"""Errors a user can act on."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input: names the file (when there is one) and the problem.

    The command-line tools print ``str(err)`` on one line and exit with
    status 2.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")


class WorkerKilled(RuntimeError):
    """A worker process died without a Python error (SIGKILL: most often the kernel's out-of-memory killer).

    The command-line tools exit with status 137, as the killed worker would have.
    """
