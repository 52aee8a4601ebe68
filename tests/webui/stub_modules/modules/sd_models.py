"""Stub of modules/sd_models.py: the checkpoint registry.

Titles are A1111's "name [shorthash]" (hash of the file), the aliases the usual ids, so
the tab must resolve choices with get_closet_checkpoint_match as in the real WebUI.
"""

import hashlib
import os
import re

from modules import paths, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        base = os.path.abspath(shared.cmd_opts.ckpt_dir or model_path)
        name = os.path.relpath(abspath, base) if abspath.startswith(base) else os.path.basename(filename)
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        with open(filename, "rb") as file:
            self.sha256 = hashlib.sha256(file.read()).hexdigest()
        self.shorthash = self.sha256[0:10]
        self.title = f"{name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.model_name, self.title, name, self.name_for_extra, self.shorthash, self.sha256, self.short_title]

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    folders = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for root, _, files in os.walk(folder):
            for file in sorted(files):
                if file.lower().endswith((".ckpt", ".safetensors")) and not file.lower().endswith(".vae.safetensors"):
                    CheckpointInfo(os.path.join(root, file)).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    checkpoint_info = checkpoint_aliases.get(search_string, None)
    if checkpoint_info is not None:
        return checkpoint_info
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    without_checksum = re.sub(re_strip_checksum, "", search_string)
    found = sorted([info for info in checkpoints_list.values() if without_checksum in info.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    return None


def unload_model_weights(sd_model=None, info=None):
    return sd_model
