"""``python -m lib_ckpt2lora``. Ctrl-C and SIGTERM are caught from the first instant: until
main() installs the CLI's own handlers (before it imports torch, 1-2 s), a press only
records the stop, and the run ends with exit 130 and its one sentence instead of a
traceback. ``cli.run`` ignores them during the exit."""

import signal

from .errors import SignalFlag

_stop = SignalFlag()


def _record_stop(signum, frame) -> None:
    _stop.set()


signal.signal(signal.SIGINT, _record_stop)
signal.signal(signal.SIGTERM, _record_stop)

from .cli import run  # noqa: E402  (after the handlers, however long the import takes)

run(stop=_stop)
