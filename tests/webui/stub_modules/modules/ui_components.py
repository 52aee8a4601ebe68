"""Stub of modules/ui_components.py: the WebUI's small gradio helpers.

Defined as A1111 1.10 does under gradio 3, as Forge / Neo do under gradio 4 (where the
wrapped signature is what keeps gradio 4's component config, elem_id included).
"""

from functools import wraps

import gradio as gr


class FormComponent:
    webui_do_not_create_gradio_pyi_thank_you = True

    def get_expected_parent(self):
        return gr.components.Form


if int(gr.__version__.split(".")[0]) < 4:

    class ToolButton(FormComponent, gr.Button):
        """Small button with single emoji as text, fits inside gradio forms"""

        def __init__(self, *args, **kwargs):
            classes = kwargs.pop("elem_classes", [])
            super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

        def get_block_name(self):
            return "button"

else:

    class ToolButton(gr.Button, FormComponent):
        """Small button with single emoji as text, fits inside gradio forms"""

        @wraps(gr.Button.__init__)
        def __init__(self, value="", *args, elem_classes=None, **kwargs):
            elem_classes = elem_classes or []
            super().__init__(*args, elem_classes=["tool", *elem_classes], value=value, **kwargs)

        def get_block_name(self):
            return "button"
