"""The tab's "Wan 2.2 experts" controls (issue 17: the tab makes the two-expert case natural).

Wan 2.2 14B ships as a high-noise and a low-noise expert file, shaped alike. Tiny real-named
Wan pairs (ComfyUI's original layout, the names ``architectures/wan.py`` detects; the 14B
width stands in by ``wan.SIZES``, as tests/test_wan.py does) are extracted through the tab's
own event with expert = both inside the Forge Neo stub, from its diffusion-model folder: two
LoRAs ``NAME_high`` / ``NAME_low``, each applied the ComfyUI / Neo way (their generic key map,
``comfy/lora.py model_lora_keys_unet``, one patch per weight) onto its own base gives its own
variant, with the expert in its metadata and Neo's ``wan`` preset in its sidecar. Also: when
the controls show, the low-noise pair proposed by name, the follow-ups switching expert, and
every mistake one sentence in the tab's words with nothing written. Runs under gradio 3.41.2
and 4.40.0 (tests/webui/run_ui_tests.sh); no diffusers needed.
"""

from __future__ import annotations

import json
import math
import re
import struct

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from test_browser import app, browser, choose  # noqa: F401 (app and browser: fixtures)
from test_neo_model_lists import load_stub
from uihelpers import run_event, write_pair

from lib_ckpt2lora.ui import job, wan_experts
from lib_ckpt2lora.ui.tab import build_tab

WIDTH, FFN, TEXT, FREQ, OUT = 32, 48, 24, 32, 16 * 2 * 2
HIGH_BASE, LOW_BASE = "wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors"
HIGH_FT, LOW_FT = "speed_high_noise.safetensors", "speed_low_noise.safetensors"


def wan_shapes(in_channels: int = 16, blocks: int = 2) -> dict[str, tuple[int, ...]]:
    """A tiny Wan T2V in ComfyUI's original layout (the keys ComfyUI's model_detection and ours read)."""
    shapes = {
        "patch_embedding.weight": (WIDTH, in_channels, 1, 2, 2),
        "patch_embedding.bias": (WIDTH,),
        "text_embedding.0.weight": (WIDTH, TEXT),
        "text_embedding.2.weight": (WIDTH, WIDTH),
        "time_embedding.0.weight": (WIDTH, FREQ),
        "time_embedding.2.weight": (WIDTH, WIDTH),
        "time_projection.1.weight": (6 * WIDTH, WIDTH),
        "head.head.weight": (OUT, WIDTH),
        "head.modulation": (1, 2, WIDTH),
    }
    for i in range(blocks):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"blocks.{i}.{attn}.{proj}.weight"] = (WIDTH, WIDTH)
            shapes[f"blocks.{i}.{attn}.norm_q.weight"] = (WIDTH,)
        shapes[f"blocks.{i}.ffn.0.weight"] = (FFN, WIDTH)
        shapes[f"blocks.{i}.ffn.2.weight"] = (WIDTH, FFN)
        shapes[f"blocks.{i}.modulation"] = (1, 6, WIDTH)
    return shapes


@pytest.fixture
def wan_14b(monkeypatch):
    from lib_ckpt2lora.architectures import wan

    monkeypatch.setattr(wan, "SIZES", {WIDTH: "14B"})  # the tiny width stands in for the 14B experts


@pytest.fixture
def neo(webui, monkeypatch, tmp_path, wan_14b):
    """The stub Forge Neo (checkpoint listing with --ckpt-dirs, Lora presets) with both experts'
    pairs in a ComfyUI diffusion_models folder and an SD1.5 pair in models/Stable-diffusion."""
    from modules import shared

    from lib_ckpt2lora.ui import webui_services

    folder = tmp_path / "ComfyUI" / "models" / "diffusion_models"
    write_pair(folder, HIGH_BASE, HIGH_FT, shapes=wan_shapes(), seed=1)
    write_pair(folder, LOW_BASE, LOW_FT, shapes=wan_shapes(), seed=2)
    write_pair(webui.models, "sd15_base.safetensors", "sd15_finetune.safetensors")
    sd_models = load_stub("neo_sd_models", "sd_models.py")
    monkeypatch.setattr(sd_models, "model_path", str(webui.models))
    monkeypatch.setattr(shared.cmd_opts, "ckpt_dirs", [str(folder)], raising=False)
    monkeypatch.setattr(webui_services, "sd_models", sd_models)
    monkeypatch.setitem(__import__("sys").modules, "network", load_stub("network", "network.py"))
    sd_models.list_models()
    from lib_ckpt2lora.ui.webui_services import WebUIServices

    blocks = build_tab(WebUIServices())
    return type("Neo", (), {"folder": folder, "loras": webui.loras, "blocks": blocks, "tab": blocks.ckpt2lora})


def run_extract(neo, **changes):
    values = dict(vars(job.Form()))
    values.update(min_dim=1, rank_thresh=0.9999, **changes)
    data = run_event(neo.blocks, neo.tab.handler, ["task(test)"] + [values[f] for f in job.FORM_FIELDS])
    return dict(zip(["table", "chart", "send", "use", "name", "compare", "select_base", "base", "variant",
                     "shown", "experts", "status"], data))


def comfy_apply(lora: dict, checkpoint: dict) -> tuple[dict, set]:
    """ComfyUI's / Neo's generic Wan map (``diffusion_model.<key>`` for a weight's module,
    the key itself for non-.weight parameters such as modulation tables) and its application:
    one patch per weight, up.flatten(1) @ down.flatten(1) reshaped (comfy/weight_adapter/lora.py)."""
    key_map = {}
    for key in checkpoint:
        full = "diffusion_model." + key
        key_map[full[: -len(".weight")] if key.endswith(".weight") else full] = key
    patched = {k: v.double().clone() for k, v in checkpoint.items()}
    modules = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    landed = set()
    for module in modules:
        target = key_map.get(module)
        if target is None:
            continue
        up, down = lora[module + ".lora_B.weight"].double(), lora[module + ".lora_A.weight"].double()
        alpha = lora.get(module + ".alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        patched[target] += (scale * (up.flatten(1) @ down.flatten(1))).reshape(patched[target].shape)
        landed.add(module)
    return patched, modules - landed


def assert_lora_gives_variant(lora_path, base_path, variant_path):
    base, variant = load_file(str(base_path)), load_file(str(variant_path))
    patched, not_landed = comfy_apply(load_file(str(lora_path)), base)
    assert not not_landed, f"keys that land on no weight: {sorted(not_landed)}"
    checked = 0
    for key, value in patched.items():
        delta = variant[key].double() - base[key].double()
        if value.ndim < 2 or not delta.any():
            continue
        error = float((value - variant[key].double()).norm() / delta.norm())
        assert error < 1e-2, (lora_path.name, key, error)
        checked += 1
    assert checked == sum(1 for v in base.values() if v.ndim >= 2)  # every matrix, tables and conv included


# -- the controls ------------------------------------------------------------------------------


def test_controls_in_both_gradios_hidden_until_a_base_with_experts(neo):
    experts = neo.tab.experts
    controls = neo.tab.components
    assert controls["expert"].label == job.FLAG_LABELS["--expert"]
    assert controls["base_low"].label.startswith(job.FLAG_LABELS["--base-low"])
    assert controls["variant_low"].label.startswith(job.FLAG_LABELS["--variant-low"])
    assert list(controls["expert"].choices) in (list(wan_experts.EXPERT_CHOICES), [(c, c) for c in wan_experts.EXPERT_CHOICES])
    assert experts.layout.group.visible is False and experts.layout.low_pair.visible is False
    assert experts.pick.shown.visible is False
    # Neo's diffusion-model folder feeds the low-noise lists too (the same lists and refresh)
    choices = {c if isinstance(c, str) else c[0] for c in controls["base_low"].choices}
    assert {HIGH_BASE, LOW_BASE, "sd15_base.safetensors"} <= choices


@pytest.mark.parametrize(
    "base, expert, shown, chosen",
    [
        (HIGH_BASE, "none", True, "high-noise"),  # the expert preselected from the file's name
        (LOW_BASE, "none", True, "low-noise"),
        (LOW_BASE, "high-noise", True, "low-noise"),  # the file says which expert it is
        (HIGH_BASE, "both", True, None),  # "both" stays
        ("wan_plain_14b.safetensors", "low-noise", True, None),  # no word in the name: the choice stays
        (HIGH_FT, "none", True, "high-noise"),
        ("sd15_base.safetensors", "both", False, "none"),  # hidden controls never change a run
        (None, "high-noise", False, "none"),
    ],
)
def test_the_base_decides_whether_the_controls_show(neo, base, expert, shown, chosen):
    write_pair(neo.folder, "wan_plain_14b.safetensors", "wan_plain_ft.safetensors", shapes=wan_shapes(), seed=7)
    neo.tab.services.refresh_checkpoints()
    group, value = run_event(neo.blocks, neo.tab.experts.events.on_base, [base, expert])
    assert group.get("visible") is shown
    assert value.get("value") == chosen if chosen else "value" not in value


def test_a_wan_model_without_experts_keeps_them_hidden(neo, monkeypatch):
    from lib_ckpt2lora.architectures import wan

    monkeypatch.setattr(wan, "SIZES", {WIDTH: "5B"})  # Wan 2.2 TI2V 5B / 2.1 1.3B: one file, no experts
    group, value = run_event(neo.blocks, neo.tab.experts.events.on_base, [HIGH_BASE, "none"])
    assert group.get("visible") is False and value.get("value") == "none"


def test_both_shows_the_low_pair_proposed_by_name(neo):
    row, base_low, variant_low = run_event(
        neo.blocks, neo.tab.experts.events.on_expert, ["both", HIGH_BASE, HIGH_FT, None, None]
    )
    assert row.get("visible") is True
    assert base_low.get("value") == LOW_BASE and variant_low.get("value") == LOW_FT
    row, base_low, _ = run_event(neo.blocks, neo.tab.experts.events.on_expert, ["both", HIGH_BASE, HIGH_FT, "x", "y"])
    assert "value" not in base_low  # the user's own choice is kept
    row = run_event(neo.blocks, neo.tab.experts.events.on_expert, ["high-noise", HIGH_BASE, HIGH_FT, None, None])[0]
    assert row.get("visible") is False
    assert wan_experts.low_noise_partner("Wan2.2_I2V_HIGH.safetensors [ab12]", ["Wan2.2_I2V_LOW.safetensors [cd34]"]) == (
        "Wan2.2_I2V_LOW.safetensors [cd34]"
    )
    assert wan_experts.expert_from_name("thigh_model.safetensors") == "none"


def test_the_output_name_for_both_drops_the_expert_word(neo):
    assert job.default_name(HIGH_FT, None, "single", "LoRA", "both") == "speed"  # -> speed_high / speed_low
    assert job.default_name("wan22_HIGH_v2.safetensors", None, "single", "LoRA", "both") == "wan22_v2"
    assert job.default_name(HIGH_FT, None, "single", "LoRA", "high-noise") == "speed_high_noise"  # one file: as named
    name, _ = run_event(neo.blocks, neo.tab.suggest, [HIGH_FT, "None", "single", "LoRA", "", "", "both"])
    assert name.get("value") == "speed"


# -- extraction --------------------------------------------------------------------------------


def test_both_writes_one_lora_per_expert_each_giving_its_own_variant(neo):
    shown = run_extract(
        neo, base=HIGH_BASE, variant=HIGH_FT, expert="both", base_low=LOW_BASE, variant_low=LOW_FT, name="speed"
    )
    status = shown["status"]
    assert "ckpt2lora-ok" in status, status
    for expert, base, variant in (("high", HIGH_BASE, HIGH_FT), ("low", LOW_BASE, LOW_FT)):
        path = neo.loras / f"speed_{expert}.safetensors"
        assert path.is_file() and f"speed_{expert}.safetensors" in status
        assert f"&lt;lora:speed_{expert}:1&gt;" in status
        assert_lora_gives_variant(path, neo.folder / base, neo.folder / variant)
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        assert metadata["ckpt2lora_expert"] == f"{expert}_noise" and metadata["ckpt2lora_variant"] == variant
        sidecar = json.loads((neo.loras / f"speed_{expert}.json").read_text())
        assert sidecar["sd version"] == "wan"  # Neo's PresetArch name: the card shows under the wan preset
        description = sidecar["description"]
        assert f"{expert}-noise expert" in description and variant.removesuffix(".safetensors") in description
    assert not (neo.loras / "speed.safetensors").exists()
    # the follow-ups use the high-noise LoRA first; "Expert shown" switches to the low-noise one
    assert (shown["name"], shown["base"], shown["variant"]) == ("speed_high", HIGH_BASE, HIGH_FT)
    assert shown["shown"].get("visible") is True and shown["shown"].get("value") == "high-noise"
    assert shown["send"].get("visible") is True
    table, chart, name, base, variant = run_event(
        neo.blocks, neo.tab.experts.events.on_shown, ["low-noise", shown["experts"]]
    )
    assert (name, base, variant) == ("speed_low", LOW_BASE, LOW_FT)
    assert table.get("visible") is True and "<svg" in str(chart.get("value"))
    assert {"speed_high", "speed_low"} <= set(neo.tab.services.list_loras())


def test_one_expert_records_it_and_names_the_file_as_typed(neo):
    status = run_extract(neo, base=LOW_BASE, variant=LOW_FT, expert="low-noise", name="style_low")["status"]
    assert "ckpt2lora-ok" in status, status
    path = neo.loras / "style_low.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["ckpt2lora_expert"] == "low_noise"
    assert_lora_gives_variant(path, neo.folder / LOW_BASE, neo.folder / LOW_FT)


def test_list_layers_lists_both_pairs(neo):
    values = dict(vars(job.Form()))
    values.update(base=HIGH_BASE, variant=HIGH_FT, expert="both", base_low=LOW_BASE, variant_low=LOW_FT)
    [shown] = run_event(neo.blocks, neo.tab.list_layers, [values[f] for f in job.FORM_FIELDS])
    text = shown["value"]
    assert "High-noise expert:" in text and "Low-noise expert:" in text and "blocks.0.ffn.0.weight" in text


# -- mistakes: one sentence in the tab's words, nothing written -----------------------------------


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(expert="both"), "choose its 'Low-noise base' and 'Low-noise variant'"),
        (dict(expert="both", base_low=LOW_BASE), "choose its 'Low-noise base' and 'Low-noise variant'"),
        (dict(expert="both", base_low=LOW_BASE, variant_low=LOW_BASE), "low-noise base and variant are the same file"),
        (dict(expert="both", base_low=LOW_BASE, variant_low="wan_i2v.safetensors"), "but the variant wan_i2v.safetensors is"),
        (dict(expert="both", base_low=LOW_BASE, variant_low=LOW_FT, name="taken"), "taken_low.safetensors already exists"),
        (dict(expert="both", base_low=LOW_BASE, variant_low=LOW_FT, output_kind=job.OUTPUT_KINDS[1]), "one LoRA per expert"),
        (dict(base="sd15_base.safetensors", variant="sd15_finetune.safetensors", expert="high-noise"),
         "names one of Wan 2.2 A14B's two expert files, but the base sd15_base.safetensors is"),
    ],
)
def test_mistakes_are_one_sentence_and_write_nothing(neo, changes, words):
    write_pair(neo.folder, "wan_i2v_base.safetensors", "wan_i2v.safetensors", shapes=wan_shapes(in_channels=36), seed=4)
    (neo.loras / "taken_low.safetensors").write_bytes(b"not ours")
    neo.tab.services.refresh_checkpoints()
    before = sorted(p.name for p in neo.loras.iterdir())
    values = dict(base=HIGH_BASE, variant=HIGH_FT, name="speed")
    values.update(changes)
    status = run_extract(neo, **values)["status"]
    assert "ckpt2lora-error" in status, status
    assert words.replace("'", "&#x27;") in status, (words, status)
    assert not re.search(r"--[a-z]", status), status  # the tab's labels, never a CLI flag
    assert sorted(p.name for p in neo.loras.iterdir()) == before  # nothing written, not even the high-noise LoRA
    assert (neo.loras / "taken_low.safetensors").read_bytes() == b"not ours"


def test_a_stop_after_the_first_expert_says_what_was_saved(neo, monkeypatch):
    from lib_ckpt2lora.errors import Cancelled

    services = neo.tab.services
    real_extract = services.extract
    calls = []

    def extract_then_stop(opts, **kwargs):
        calls.append(opts.expert)
        if len(calls) == 2:
            raise Cancelled()
        return real_extract(opts, **kwargs)

    monkeypatch.setattr(services, "extract", extract_then_stop)
    result = job.run_job(
        services,
        job.Form(base=HIGH_BASE, variant=HIGH_FT, expert="both", base_low=LOW_BASE, variant_low=LOW_FT, name="cut", min_dim=1),
    )
    assert calls == ["high", "low"] and result.cancelled and not result.ok
    assert "cut_high.safetensors" in result.message and "was not written" in result.message
    assert "nothing was written" not in result.message
    assert (neo.loras / "cut_high.safetensors").is_file()


# -- in the page (headless Chromium, the standalone app of test_browser.py) ------------------------


def write_header_only_wan_14b(path):
    """A file with Wan 14B's real detection shapes (width 5120: no SIZES stand-in in the app's own
    process), its data a sparse hole: the tab reads only the header to decide what to show."""
    shapes = {"patch_embedding.weight": [5120, 16, 1, 2, 2], "head.modulation": [1, 2, 5120],
              "blocks.0.self_attn.q.weight": [5120, 5120]}  # fmt: skip
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + offset)


@pytest.fixture
def wan_files(tmp_path):
    """The expert files in the app's models folder before the app starts (test_browser's app
    fixture uses tmp_path/checkpoints), so they are in the first lists: under load in CI a
    refresh clicked right after the page appeared was lost in the A1111 stack's gradio 3."""
    for name in (HIGH_BASE, LOW_BASE, HIGH_FT, LOW_FT):
        write_header_only_wan_14b(tmp_path / "checkpoints" / name)


@pytest.mark.browser
def test_the_controls_show_in_the_page_for_a_wan_expert_base(wan_files, browser, app):  # noqa: F811
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(app.url)
    page.wait_for_selector("#ckpt2lora_base input")
    assert not page.is_visible("#ckpt2lora_expert")
    choose(page, "ckpt2lora_base", HIGH_BASE)
    page.wait_for_selector("#ckpt2lora_expert", state="visible", timeout=30_000)
    page.wait_for_function("document.querySelector(\"#ckpt2lora_expert input[value='high-noise']\").checked")
    assert not page.is_visible("#ckpt2lora_base_low")
    choose(page, "ckpt2lora_variant", HIGH_FT)
    page.click("#ckpt2lora_expert label:has-text('both')")
    page.wait_for_selector("#ckpt2lora_base_low", state="visible", timeout=30_000)
    page.wait_for_function(f"document.querySelector('#ckpt2lora_base_low input').value === '{LOW_BASE}'")
    page.wait_for_function(f"document.querySelector('#ckpt2lora_variant_low input').value === '{LOW_FT}'")
    page.wait_for_function("document.querySelector('#ckpt2lora_name textarea').value === 'speed'")
    choose(page, "ckpt2lora_base", "base.safetensors")  # SD1.5: hidden again
    page.wait_for_selector("#ckpt2lora_expert", state="hidden", timeout=30_000)
    page.close()
