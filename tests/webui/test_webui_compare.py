"""Compare (issue 11 s4) and Send to txt2img's base-model choice, in the stub WebUI.

The stub's ``modules.processing`` renders a deterministic image from (checkpoint file,
LoRA tags and weights, prompt, seed, size), so each image can be checked against the one
the right model and LoRA would give; the similarity is checked against numpy directly.
Run under gradio 4.40.0 and 3.41.2 (run_ui_tests.sh).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_webui_tab import extract, title_of, webui_tab
from uihelpers import run_event, write_pair

from lib_ckpt2lora.ui import compare

SETTINGS = {"prompt": "a red fox <lora:fox:1>", "negative_prompt": "blurry", "seed": "1234", "steps": "3",
            "width": "96", "height": "64", "cfg_scale": "5", "sampler_name": "Euler a",
            "scheduler": "Karras"}  # fmt: skip


@pytest.fixture
def extracted(webui):
    """The stub WebUI with an SD1.5-layout pair and a LoRA extracted from it by the tab."""
    from modules import sd_models

    write_pair(webui.models, "sd15_base.safetensors", "sd15_finetune.safetensors")
    sd_models.list_models()
    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    base, variant = title_of(services, "sd15_base"), title_of(services, "sd15_finetune")
    data = extract(blocks, base=base, variant=variant, name="fox")
    assert "Saved the LoRA" in data[-1], data[-1]
    return blocks, data, base, variant


def shown(view) -> list[tuple[str, np.ndarray]]:
    """The compare view as the browser gets it: (caption, decoded PNG) per image."""
    assert view["visible"] is True
    found = re.findall(r"<figcaption>([^<]*)</figcaption><img src='data:image/png;base64,([^']*)'", view["value"])
    return [(html.unescape(label), np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")))
            for label, data in found]  # fmt: skip


def expected_image(path, networks, prompt, seed, width=96, height=64) -> np.ndarray:
    from modules import processing

    return np.asarray(processing._render(str(path), networks, prompt, seed, width, height))


def run_compare(blocks, data, settings=SETTINGS):
    tab = blocks.ckpt2lora
    name, base, variant = data[4], data[7], data[8]
    return run_event(blocks, tab.compare_handler, ["task(cmp)", json.dumps(settings), name, base, variant])


def test_extract_shows_compare_and_the_base_choice(extracted):
    blocks, data, base, variant = extracted
    _, _, send, _, name, compare_button, select_base, result_base, result_variant, *_ = data
    assert send.get("visible") is True and compare_button.get("visible") is True
    assert select_base.get("visible") is True
    assert blocks.ckpt2lora.select_base.value is True  # on by default
    assert "base" in blocks.ckpt2lora.select_base.label
    assert (name, result_base, result_variant) == ("fox", base, variant)


def test_compare_generates_variant_and_base_plus_lora(extracted):
    from modules import shared

    blocks, data, _, _ = extracted
    view, status = run_compare(blocks, data)
    (first, got_variant), (second, got_lora) = shown(view)
    models = blocks.ckpt2lora.services.lora_dir().parent / "Stable-diffusion"
    # The prompt without our tag on the variant; on the base with <lora:fox:1>; same seed.
    want_variant = expected_image(models / "sd15_finetune.safetensors", [], "a red fox", 1234)
    want_lora = expected_image(models / "sd15_base.safetensors", [("fox", 1.0)], "a red fox", 1234)
    assert np.array_equal(got_variant, want_variant)
    assert np.array_equal(got_lora, want_lora)
    assert "sd15_finetune" in first and "sd15_base" in second and "fox" in second
    # The figures, against numpy directly and the tab's own SSIM.
    mad = np.abs(want_variant.astype(float) - want_lora.astype(float)).mean()
    luma = [compare.luminance(a.astype(float)) for a in (want_variant, want_lora)]
    assert f"mean absolute pixel difference {mad:.1f} of 255" in status
    assert f"SSIM {compare.ssim(*luma):.3f}" in status
    assert "Seed 1234" in status and "ckpt2lora-similarity" in status
    assert 0.0 < compare.ssim(*luma) < 0.99 and mad > 1
    assert shared.opts.sd_model_checkpoint is None  # the override was for those two images only


def test_compare_generates_with_the_txt2img_settings(extracted, monkeypatch):
    """Every txt2img field the page sends reaches the WebUI's processing, the Schedule type
    too (Forge Neo and A1111 1.9+ show it beside the sampler; it was left out before the
    real-Neo run)."""
    from modules import processing

    blocks, data, _, _ = extracted
    real, made = processing.process_images, []
    monkeypatch.setattr(processing, "process_images", lambda p: made.append(p) or real(p))
    assert "SSIM" in run_compare(blocks, data)[-1]
    assert len(made) == 2
    for p in made:
        assert (p.negative_prompt, p.seed, p.steps, p.width, p.height) == ("blurry", 1234, 3, 96, 64)
        assert (p.cfg_scale, p.sampler_name, p.scheduler) == (5.0, "Euler a", "Karras")


def test_compare_random_seed_uses_one_seed_for_both(extracted):
    blocks, data, _, _ = extracted
    view, status = run_compare(blocks, data, dict(SETTINGS, seed="-1"))
    (_, first), (_, second) = shown(view)
    seed = int(status.split("Seed ", 1)[1].split(":", 1)[0])
    models = blocks.ckpt2lora.services.lora_dir().parent / "Stable-diffusion"
    assert np.array_equal(first, expected_image(models / "sd15_finetune.safetensors", [], "a red fox", seed))
    assert np.array_equal(second, expected_image(models / "sd15_base.safetensors", [("fox", 1.0)], "a red fox", seed))


def test_compare_waits_for_the_webuis_queue(extracted):
    from modules import call_queue

    blocks, data, _, _ = extracted
    results = []
    with call_queue.queue_lock:  # a txt2img generation is running
        worker = threading.Thread(target=lambda: results.append(run_compare(blocks, data)))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and not results
    worker.join(timeout=60)
    assert results and "SSIM" in results[0][-1]


def test_interrupt_during_compare(extracted, monkeypatch):
    from modules import processing, shared

    blocks, data, _, _ = extracted
    real = processing.process_images

    def interrupted_first(p):
        shared.state.interrupt()  # the WebUI's Interrupt pressed during the first image
        return real(p)

    monkeypatch.setattr(processing, "process_images", interrupted_first)
    view, status = run_compare(blocks, data)
    assert compare.INTERRUPTED in status and "ckpt2lora-stopped" in status
    assert view["visible"] is False


def test_interrupt_during_sampling_of_the_second_image(extracted, monkeypatch):
    """The WebUI's Interrupt while the base + LoRA image samples: A1111 and Neo still return
    the unfinished image (a real Neo showed SSIM 0.985 for one stopped at step 2 of 12);
    Compare must say it was interrupted, not measure it."""
    from modules import processing, shared

    blocks, data, _, _ = extracted
    calls = []

    def press_interrupt(p, step):
        calls.append((p.prompt, step))
        if "<lora:fox:1>" in p.prompt and step == 1:  # the second image, mid-sampling
            shared.state.interrupt()

    monkeypatch.setattr(processing, "_on_sampling_step", press_interrupt)  # a test hook, not a WebUI name
    view, status = run_compare(blocks, data)
    assert any("<lora:fox:1>" in prompt and step == 1 for prompt, step in calls)  # it was pressed there
    assert compare.INTERRUPTED in status and "ckpt2lora-stopped" in status and "SSIM" not in status
    assert view["visible"] is False


def test_compare_with_a_checkpoint_gone_is_one_sentence(extracted):
    from modules import sd_models

    blocks, data, base, _ = extracted
    for info in list(sd_models.checkpoints_list.values()):
        if "sd15_base" in info.title:
            sd_models.checkpoints_list.pop(info.title)
            for alias in info.ids:
                sd_models.checkpoint_aliases.pop(alias, None)
    status = run_compare(blocks, data)[-1]
    assert "ckpt2lora-error" in status and base in status and "not in the checkpoint list" in status
    assert "Traceback" not in status


def test_no_compare_for_two_variants_or_checkpoints(webui):
    from modules import sd_models

    from lib_ckpt2lora.ui import job

    write_pair(webui.models, "sd15_base.safetensors", "sd15_finetune.safetensors")
    sd_models.list_models()
    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    base, variant = title_of(services, "sd15_base"), title_of(services, "sd15_finetune")
    data = extract(blocks, base=base, variant=variant, output_kind=job.OUTPUT_KINDS[1], name="ck")
    assert "Saved the checkpoint" in data[-1]
    assert data[5].get("visible") is False and data[6].get("visible") is False


# -- units -----------------------------------------------------------------------------
def test_plan_compare_tags_and_lora_variants():
    settings = compare.parse_settings(json.dumps({"prompt": "cat, <lora:new:0.5> <lora:other:1>", "seed": "7"}))
    first, second = compare.plan_compare("new", "base [1]", "ft [2]", settings)
    assert (first.checkpoint, first.prompt) == ("ft [2]", "cat, <lora:other:1>")
    assert (second.checkpoint, second.prompt) == ("base [1]", "cat, <lora:other:1> <lora:new:1>")
    first, second = compare.plan_compare("new", "base [1]", "LoRA: style", settings)
    assert (first.checkpoint, first.prompt) == ("base [1]", "cat, <lora:other:1> <lora:style:1>")
    assert compare.parse_settings("not json") == compare.Txt2imgSettings()
    assert compare.parse_settings('{"steps": "x", "width": "8"}').width == 64


def brute_force_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM window by window with explicit loops (Wang et al. 2004), to check the filtered one."""
    g = compare.gaussian_window()
    w = np.outer(g, g)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            x, y = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
            cov = (w * (x - mx) * (y - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_definition():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, size=(20, 23))
    b = np.clip(a + rng.normal(0, 30, size=a.shape), 0, 255)
    assert compare.ssim(a, b) == pytest.approx(brute_force_ssim(a, b), abs=1e-9)
    assert compare.ssim(a, a) == pytest.approx(1.0)
    # Two flat images: only the luminance term is left, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = (0.01 * 255) ** 2
    flat = compare.ssim(np.full((16, 16), 100.0), np.full((16, 16), 150.0))
    assert flat == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1))
    same = compare.similarity(Image.new("RGB", (16, 16), (10, 20, 30)), Image.new("RGB", (16, 16), (12, 20, 30)))
    assert same.mean_abs_diff == pytest.approx(2 / 3)
