"""The ComfyUI node pack: ``Ckpt2LoraExtract``, loaded by the repository root's ``__init__.py``.

Importing this package imports neither ComfyUI nor gradio, nor anything the library's own
import does not: ComfyUI's modules (``folder_paths``, ``comfy.model_management``,
``comfy.utils``), the engine, Pillow and the tab's helpers are imported inside the node's
methods, when ComfyUI runs them. The name is always ``lib_ckpt2lora.comfy``, never
a top-level ``comfy`` (ComfyUI's own package).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
