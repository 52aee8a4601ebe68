"""ComfyUI node pack entry: ComfyUI imports this file when the repository sits in
``ComfyUI/custom_nodes/`` (``nodes.py load_custom_node``). Glue only, like ``scripts/``:
the node lives in ``lib_ckpt2lora/comfy/``. Importing it imports neither ComfyUI nor gradio,
nothing beyond what ``import lib_ckpt2lora`` imports; the WebUIs never import it (they run
``scripts/*.py``, ``preload.py`` and ``install.py`` by path).
"""

from .lib_ckpt2lora.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
