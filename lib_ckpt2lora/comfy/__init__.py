"""The ComfyUI node pack: ``Ckpt2LoraExtract``, loaded by the repository root's ``__init__.py``.

Importing this package imports neither ComfyUI nor torch nor gradio: ComfyUI's modules
(``folder_paths``, ``comfy.model_management``, ``comfy.utils``) are imported inside the
node's methods, when ComfyUI runs them. The name is always ``lib_ckpt2lora.comfy``, never
a top-level ``comfy`` (ComfyUI's own package).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
