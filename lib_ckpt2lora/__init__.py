"""ckpt2lora: turn the difference between a base model and a variant into a LoRA.

Library use::

    from lib_ckpt2lora import ExtractOptions, extract
    result = extract(ExtractOptions(base="base.safetensors", variant="v.safetensors", out="v_lora.safetensors"))
    print(result.report.summary_text())

Importing this package needs neither gradio nor the WebUI, nor (until ``extract`` is first
used) torch: ``ckpt2lora --help`` and ``--version`` answer at once.
"""

import sys
import types

from .constants import VERSION
from .errors import Cancelled, UserError
from .options import ExtractOptions

__all__ = ["VERSION", "Cancelled", "ExtractOptions", "ExtractResult", "UserError", "extract"]
__version__ = VERSION

# The runner module is ``lib_ckpt2lora.extract`` and its entry point is the function
# ``extract``; both want the package attribute ``extract``. They are imported on first use
# (torch takes seconds to import), so the import system would bind the submodule to the
# attribute when it loads it: _Package keeps the function there instead.
_LAZY = {"extract": "extract", "ExtractResult": "extract"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    object.__setattr__(sys.modules[__name__], name, value)
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable as sys.modules["lib_ckpt2lora.extract"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
