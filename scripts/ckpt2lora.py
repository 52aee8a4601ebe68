"""WebUI glue: registers the ckpt2lora tab. All logic lives in lib_ckpt2lora.

The WebUI executes this file as a script (not registered in sys.modules). In
AUTOMATIC1111 the extension's root is on sys.path only while it runs, so the library and
its tab are imported here, at the top; the tab is built when the WebUI builds its UI.
"""

from modules import script_callbacks

import lib_ckpt2lora  # noqa: F401  (must import while the extension root is on sys.path)
import lib_ckpt2lora.ui.tab  # noqa: F401
import lib_ckpt2lora.ui.webui_services  # noqa: F401


def on_ui_tabs():
    from lib_ckpt2lora.ui.tab import build_tab
    from lib_ckpt2lora.ui.webui_services import WebUIServices

    return [(build_tab(WebUIServices()), "ckpt2lora", "ckpt2lora")]


script_callbacks.on_ui_tabs(on_ui_tabs)
