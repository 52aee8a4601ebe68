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


def progress_kwargs(show: bool) -> dict:
    """gradio 3 takes a bool, gradio 4 "full" / "hidden"."""
    if GRADIO_MAJOR < 4:
        return {"show_progress": show}
    return {"show_progress": "full" if show else "hidden"}


def table_kwargs() -> dict:
    """Column widths for the summary table (gradio 4 only; gradio 3 sizes columns itself)."""
    if GRADIO_MAJOR < 4:
        return {"wrap": True}
    return {"wrap": True, "column_widths": ["22%", "10%", "7%", "8%", "12%", "12%", "12%", "17%"]}


def gr_update(**kwargs):
    return gr.update(**kwargs)

