"""Stub of modules/processing.py: txt2img through ``process_images``, as Compare uses it.

What is mirrored from A1111 1.10 / Forge Neo: ``StableDiffusionProcessingTxt2Img`` takes
keyword fields; ``process_images`` drops an ``sd_model_checkpoint`` override that
``sd_models.checkpoint_aliases`` does not know (the loaded model is used instead), applies
the overrides to ``shared.opts`` and restores them afterwards; the sampling loop stops
without an image when ``state.interrupted or state.stopping_generation`` before it starts;
an Interrupt during sampling stops the sampler, but the unfinished image is still decoded
and returned (the samplers catch the interrupt and return their last latent: seen in a real
Forge Neo); ``<lora:NAME:w>`` tags are removed from the prompt and activate the network.
``_on_sampling_step(p, step)``, if set, is called at each step (the samplers' callback),
where a test presses Interrupt. The image itself is a
deterministic function of (checkpoint file, networks and weights, prompt, seed, size),
so a test can tell which model and which LoRA made which image.
"""

import hashlib
import re

import numpy as np
from PIL import Image

from modules import sd_models, shared

_RE_LORA = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")

_on_sampling_step = None  # a test's hook: called as _on_sampling_step(p, step) at each step


class StableDiffusionProcessingTxt2Img:
    def __init__(self, prompt="", negative_prompt="", seed=-1, steps=50, width=512, height=512, cfg_scale=7.0,
                 sampler_name=None, scheduler=None, n_iter=1, batch_size=1, do_not_save_samples=False, do_not_save_grid=False,
                 override_settings=None, override_settings_restore_afterwards=True):  # fmt: skip
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.steps = steps
        self.width = width
        self.height = height
        self.cfg_scale = cfg_scale
        self.sampler_name = sampler_name
        self.scheduler = scheduler
        self.n_iter = n_iter
        self.batch_size = batch_size
        self.do_not_save_samples = do_not_save_samples
        self.do_not_save_grid = do_not_save_grid
        self.override_settings = dict(override_settings or {})
        self.override_settings_restore_afterwards = override_settings_restore_afterwards
        self.sd_model_name = None
        self.extra_network_data = None

    def close(self):
        pass


class Processed:
    def __init__(self, p, images_list, seed=-1, info=""):
        self.images = images_list
        self.prompt = p.prompt
        self.seed = seed
        self.info = info
        self.sd_model_name = p.sd_model_name


def _render(checkpoint_path, networks, prompt, seed, width, height):
    """A smooth picture from (prompt, seed) plus a pattern per model and per LoRA weight."""
    def rng(*parts):
        digest = hashlib.sha256(repr(parts).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    scene = rng("scene", prompt, seed).uniform(0.5, 4.0, size=(3, 2))
    image = np.stack([127 + 100 * np.sin(a * x * 6.28 + b * y * 6.28) for a, b in scene], axis=-1)
    with open(checkpoint_path, "rb") as file:
        model = hashlib.sha256(file.read()).hexdigest()
    image += 20 * rng("model", model, seed).standard_normal((height, width, 3))
    for name, weight in sorted(networks):
        image += 10 * weight * rng("lora", name, seed).standard_normal((height, width, 3))
    return Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8))


def process_images(p):
    opts = shared.opts
    stored = {k: getattr(opts, k, None) for k in p.override_settings}
    try:
        if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
            p.override_settings.pop("sd_model_checkpoint", None)
        for k, v in p.override_settings.items():
            setattr(opts, k, v)
        info = sd_models.get_closet_checkpoint_match(opts.sd_model_checkpoint)
        state = shared.state
        if state.job_count == -1:
            state.job_count = p.n_iter
        images = []
        if not (state.interrupted or state.stopping_generation):
            networks = [(m.group(1), float(m.group(2) or 1)) for m in _RE_LORA.finditer(p.prompt)]
            p.extra_network_data = {"lora": networks}
            prompt = _RE_LORA.sub("", p.prompt).strip()
            p.sd_model_name = info.name_for_extra
            image = _render(info.filename, networks, prompt, p.seed, p.width, p.height)
            for step in range(p.steps):
                if _on_sampling_step is not None:
                    _on_sampling_step(p, step)
                if state.interrupted:  # the sampler stops; what it has is decoded all the same
                    done = step / p.steps
                    image = Image.blend(Image.new("RGB", image.size, (127, 127, 127)), image, done)
                    break
            images.append(image)
            state.job_no += 1
        return Processed(p, images, p.seed)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored.items():
                setattr(opts, k, v)
