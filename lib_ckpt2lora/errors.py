"""Errors a user can cause, and cancellation.

Every failure a user can provoke is raised as ``UserError`` carrying one sentence that
names the file or key and says what to do; the CLI prints it and exits 2, the UI shows
it in red. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Cancelled(Exception):
    """The user interrupted the run (Ctrl-C, SIGTERM, the WebUI's Interrupt)."""

    exit_code = 130

    def __init__(self, message: str = "Interrupted: nothing was written."):
        super().__init__(message)
        self.message = message
