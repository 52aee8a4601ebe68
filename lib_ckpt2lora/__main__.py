"""``python -m lib_ckpt2lora``. Ctrl-C and SIGTERM are caught from the first instant: until
the CLI's own handlers take over, a press only records the stop, and main() ends with exit
130 and its one sentence, instead of a traceback from inside torch's 1-2 s import (the
package imports without torch). After main() the signals are ignored: a press during the
interpreter's exit would otherwise end the process by the signal."""

import signal
import sys
import threading

_stop = threading.Event()


def _record_stop(signum, frame) -> None:
    _stop.set()


signal.signal(signal.SIGINT, _record_stop)
signal.signal(signal.SIGTERM, _record_stop)

from .cli import main  # noqa: E402  (imports torch)

try:
    code = main(stop=_stop)
finally:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.exit(code)
