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


class SignalFlag:
    """A flag a signal handler sets and other code reads: ``set``, ``clear``, ``is_set``,
    as on ``threading.Event``, but a plain attribute with no lock behind it.

    ``Event.set`` takes a lock. A handler that runs again while the first one holds it
    (Ctrl-C pressed again and again) waits on its own thread forever; each further press
    nests one more handler, until a RecursionError ends the process (seen in CI, Python
    3.10). Nothing waits on these flags, so no lock is needed: an attribute write is atomic.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set
