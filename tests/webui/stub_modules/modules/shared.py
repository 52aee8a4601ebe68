"""Stub of modules/shared.py: command-line options and the job state."""

import argparse
import os

from modules import paths, shared_state

cmd_opts = argparse.Namespace(
    lora_dir=os.path.join(paths.models_path, "Lora"),  # added by the Lora extension's preload.py
    ckpt_dir=None,
)
state = shared_state.State()
