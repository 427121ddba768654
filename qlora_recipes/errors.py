"""Errors a user can cause. The CLI prints them without a traceback and exits with code 2."""


class RecipeError(Exception):
    """A recipe, override or combination of settings that cannot work; the message says how to fix it."""


class DataError(RecipeError):
    """A data set that is missing, empty or malformed; the message names the file, line or column."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; exit code 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class LaunchFailed(Exception):
    """A multi-process job ended with a non-zero code; the failing rank's error was printed by it."""

    def __init__(self, returncode: int, message: str):
        super().__init__(message)
        self.returncode = returncode
