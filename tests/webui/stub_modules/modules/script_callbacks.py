"""Stub of modules/script_callbacks.py: the ui_tabs callbacks."""

callback_map = {"callbacks_ui_tabs": []}


def on_ui_tabs(callback, *, name=None):
    callback_map["callbacks_ui_tabs"].append(callback)


def ui_tabs_callback():
    res = []
    for callback in callback_map["callbacks_ui_tabs"]:
        res += callback() or []
    return res
