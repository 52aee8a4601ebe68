"""Stub of modules/shared.py: command-line options and the job state."""

import argparse
import os

from modules import paths, shared_state

cmd_opts = argparse.Namespace(
    lora_dir=os.path.join(paths.models_path, "Lora"),  # added by the Lora extension's preload.py
    ckpt_dir=None,
)
state = shared_state.State()
# shared.opts (an options.Options in the WebUI): the settings the tab's tests touch.
# interrupt_after_current is "Don't Interrupt in the middle" (A1111 default True, Neo False);
# sd_model_checkpoint is the loaded checkpoint's title, which process_images overrides.
opts = argparse.Namespace(interrupt_after_current=True, sd_model_checkpoint=None, data={})
