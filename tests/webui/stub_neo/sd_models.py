"""Stub of Forge Neo's modules/sd_models.py: where its checkpoint list comes from.

As in nolanlane/sd-webui-forge-classic (@3df257a .. @6e1e0d5, unchanged there): ``list_models``
walks every ``--ckpt-dirs`` folder (``cmd_opts.ckpt_dirs``, where Neo users point ComfyUI's
``diffusion_models`` / ``unet`` folders: ``modules/launch_utils.py configure_comfy_reference``)
and then ``models/Stable-diffusion``; a checkpoint's ``name`` is its path inside the folder it
was found in, and ``checkpoint_tiles()`` lists the names (A1111 lists titles). Without a cached
sha256 the title is the bare name, as here.
"""

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
        name = os.path.basename(filename)
        for folder in (*shared.cmd_opts.ckpt_dirs, model_path):
            if abspath.startswith(os.path.abspath(folder)):
                name = abspath.replace(os.path.abspath(folder), "")
                break
        name = name.strip("/").strip("\\")
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.sha256 = None
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.title, name, self.name_for_extra]

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.name for x in checkpoints_list.values()]


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    found = set()
    for folder in (*shared.cmd_opts.ckpt_dirs, model_path):
        if not os.path.isdir(folder):
            continue
        for root, _, files in os.walk(folder):
            for file in files:
                if file.lower().endswith((".ckpt", ".safetensors", ".gguf")) and not file.lower().endswith(".vae.safetensors"):
                    found.add(os.path.join(root, file))
    for filename in sorted(found):
        CheckpointInfo(filename).register()


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
    return found[0] if found else None


def unload_model_weights(sd_model=None, info=None):
    return sd_model
