"""The few gradio 3 / gradio 4 differences the tab meets, in one place.

The tab is written gradio-3 style (``gr.update``, a JS function per event). Forge and Neo
translate ``_js=`` to gradio 4's ``js=``, plain gradio 4 (the standalone app) does not,
so events get their JS through ``js_kwargs``.
"""

from __future__ import annotations

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def js_kwargs(code: str) -> dict:
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def gr_update(**kwargs):
    return gr.update(**kwargs)
