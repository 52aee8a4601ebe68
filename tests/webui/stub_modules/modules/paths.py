"""Stub of modules/paths.py: where the WebUI keeps its models."""

import os
import tempfile

script_path = os.environ.get("CKPT2LORA_STUB_ROOT", os.path.join(tempfile.gettempdir(), "ckpt2lora-stub-webui"))
models_path = os.path.join(script_path, "models")
