"""Wan 2.1 / 2.2: name maps at full size, and its LoRAs in real loaders on a tiny model.

Full size (meta device, diffusers' ``WanTransformer3DModel`` with the 14B T2V, 14B I2V, TI2V
5B and 1.3B configs): the original layout written by our name table is exactly what diffusers'
own single-file converter (``convert_wan_transformer_to_diffusers``, written independently)
turns into the model's keys; every weight of every layout (original bare and all-in-one,
diffusers) has a LoRA module; diffusers' Wan LoRA converters turn each format into modules
of the model. Tiny real model (I2V with CLIP image input, so k_img/v_img and img_emb too):
``--format diffusers`` loads in ``WanPipeline`` with every module injected (patch_embedding
as a Conv3d LoRA) and weights = variant; the default and kohya formats applied the ComfyUI /
Forge Neo way (their generic key map, one patch per weight, conv factors flattened and
reshaped as ``comfy/weight_adapter/lora.py`` does) give every weight = variant. Refusals and
the two-expert run end to end through the CLI.
"""

from __future__ import annotations

import json

import loader_checks as lc
import pytest
import tiny_models as tm
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file
from test_names import converted_modules, infos_of, lora_entries, meta, module_names

from lib_ckpt2lora import architectures, cli
from lib_ckpt2lora.architectures.base import FileView
from lib_ckpt2lora.architectures.wan import to_original
from lib_ckpt2lora.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL_IN_ONE = "model.diffusion_model."
# diffusers' configs of the released checkpoints (Wan-AI/*-Diffusers transformer/config.json)
FULL = {
    "14B T2V": dict(num_attention_heads=40, in_channels=16, ffn_dim=13824, num_layers=40),
    "14B I2V (CLIP image input)": dict(
        num_attention_heads=40, in_channels=36, ffn_dim=13824, num_layers=40, image_dim=1280, added_kv_proj_dim=5120
    ),
    "5B TI2V": dict(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30),
    "1.3B T2V": dict(num_attention_heads=12, in_channels=16, ffn_dim=8960, num_layers=30),
}
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=36,
    out_channels=16,
    text_dim=24,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    image_dim=20,
    added_kv_proj_dim=32,
    rope_max_seq_len=32,
)


def to_original_layout(state):
    return {to_original(k): v for k, v in state.items()}


def all_in_one(state):
    state = {ALL_IN_ONE + k: v for k, v in state.items()}
    state["text_encoders.umt5xxl.transformer.shared.weight"] = torch.empty(256384, 4096, device="meta")
    state["vae.decoder.conv_in.weight"] = torch.empty(384, 16, 3, 3, 3, device="meta")
    return state


# -- full size ------------------------------------------------------------------------------


def full_size(kind):
    model = meta(lambda: WanTransformer3DModel(**FULL[kind]))
    return model, {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", list(FULL))
def test_original_layout_matches_diffusers_single_file_converter(kind):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    _, state = full_size(kind)
    original = to_original_layout(state)
    assert "head.modulation" in original and "blocks.0.self_attn.q.weight" in original and "blocks.0.ffn.0.weight" in original
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert set(converted) == set(state)
    assert all(converted[k].shape == state[k].shape for k in state)


@pytest.mark.parametrize("kind", list(FULL))
@pytest.mark.parametrize("layout", ["original", "all-in-one", "diffusers", "transformer."])
def test_full_size_detection_and_every_weight_named(kind, layout):
    model, state = full_size(kind)
    if layout in ("original", "all-in-one"):
        state = to_original_layout(state)
    if layout == "all-in-one":
        state = all_in_one(state)
    if layout == "transformer.":
        state = {"transformer." + k: v for k, v in state.items()}
    infos = infos_of(state)
    arch = architectures.detect(infos, strict=True)
    assert arch.name == "wan"
    blocks = FULL[kind]["num_layers"]
    spelled = "diffusers" if layout in ("diffusers", "transformer.") else "original"
    described = arch.describe(infos)
    assert described.startswith(f"Wan 2.1/2.2 {kind}, {spelled} layout, {blocks} blocks"), described
    assert ("text_encoders, vae skipped (text encoder/VAE" in described) == (layout == "all-in-one")
    assert arch.has_experts == (kind == "14B T2V")
    view = FileView.build(type("F", (), {"infos": infos})(), arch)
    matrices = {k for k, shape in view.shapes.items() if len(shape) >= 2}
    tables = {k for k in matrices if k.endswith("modulation")}  # [1,6,dim] / [1,2,dim] parameters
    assert len(tables) == blocks + 1
    for fmt in arch.formats:
        modules, missing = lora_entries(arch, fmt, infos)
        named = set(modules.values())
        if fmt == "diffusion_model":  # every table too: ComfyUI maps diffusion_model.<name> for any parameter
            assert missing == [] and named == matrices
        else:  # no diffusers module, no lora_unet_ entry for a parameter table
            assert sorted(missing) == sorted(tables) and named == matrices - tables
        if fmt == "diffusers":
            assert {m.removeprefix("transformer.") for m in modules} <= module_names(model)


def sized_lora(arch, fmt, infos, keep=lambda key: True):
    """Rank-1 zero factors in each module's real shape (conv kernels as LoCon)."""
    view = FileView.build(type("F", (), {"infos": infos})(), arch)
    modules, _ = lora_entries(arch, fmt, infos)
    style, state = arch.formats[fmt], {}
    for module, key in modules.items():
        if not keep(key):
            continue
        shape = view.shapes[key]
        state[module + style.down] = torch.zeros(1, *shape[1:])
        state[module + style.up] = torch.zeros(shape[0], 1, *([1] * (len(shape) - 2)))
        if style.writes_alpha:
            state[module + ".alpha"] = torch.tensor(1.0)
    return state, view


@pytest.mark.parametrize("kind", ["14B T2V", "14B I2V (CLIP image input)", "5B TI2V"])
def test_full_size_formats_convert_in_diffusers(kind):
    model, state = full_size(kind)
    infos = infos_of(all_in_one(to_original_layout(state)))
    arch = architectures.detect(infos)
    linears = {k.rpartition(".")[0] for k, v in state.items() if k.endswith(".weight") and len(v.shape) == 2}
    # diffusers format: loaded as is, patch_embedding included
    lora, _ = sized_lora(arch, "diffusers", infos)
    landed = {n.removeprefix("transformer.") for n in converted_modules(WanPipeline.lora_state_dict(lora))}
    assert landed == linears | {"patch_embedding"}
    # default format: diffusers' converter takes every Linear; patch_embedding and the
    # modulation tables make it raise (diffusers users take --format diffusers)
    lora, _ = sized_lora(arch, "diffusion_model", infos)
    with pytest.raises(ValueError, match="should be empty"):
        WanPipeline.lora_state_dict(dict(lora))
    convertible = lambda key: not key.startswith("patch_embedding") and "modulation" not in key  # noqa: E731
    lora, _ = sized_lora(arch, "diffusion_model", infos, keep=convertible)
    landed = {n.removeprefix("transformer.") for n in converted_modules(WanPipeline.lora_state_dict(lora))}
    assert landed == linears
    # kohya (musubi-tuner's names): diffusers' musubi converter takes a blocks-only file
    lora, _ = sized_lora(arch, "kohya", infos, keep=lambda k: k.startswith("blocks."))
    landed = {n.removeprefix("transformer.") for n in converted_modules(WanPipeline.lora_state_dict(lora))}
    assert landed == {m for m in linears if m.startswith("blocks.")}


def test_report_groups_blocks_by_depth():
    _, state = full_size("14B T2V")
    arch = architectures.detect(infos_of(to_original_layout(state)))
    assert arch.group("blocks.0.self_attn.q.weight").level == "L1 (blk 0-7)"
    assert arch.group("blocks.39.cross_attn.k.weight").level == "L5 (blk 32-39)"
    keys = (
        "blocks.3.self_attn.o.weight",
        "blocks.3.cross_attn.q.weight",
        "blocks.3.ffn.2.weight",
        "blocks.3.modulation",
        "time_projection.1.weight",
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "head.head.weight",
    )
    assert [arch.group(k).type for k in keys] == ["Attn", "XAttn", "FF", "Mod", "Mod", "Embed", "Embed", "Head"]
    assert arch.group("text_embedding.0.weight").auxiliary


# -- tiny real model ------------------------------------------------------------------------------


def tiny_transformer(seed=0):
    return tm.randomize_(WanTransformer3DModel(**TINY), seed).eval()


def make_pair(folder, base_layout="original", variant_layout="original", prefix="", seed=1, scale=1e-2):
    model = tiny_transformer()
    state = model.state_dict()
    tiny = tm.TinyModel({"transformer": model}, "wan", {to_original(k): ("transformer", k) for k in state})
    base = tiny.states()
    variant = {"transformer": tm.make_variant(base["transformer"], seed=seed, scale=scale)}
    folder.mkdir(parents=True, exist_ok=True)

    def layout(state, kind):
        state = to_original_layout(state) if kind == "original" else dict(state)
        return {prefix + k: v for k, v in state.items()}

    base_path = tm.save(layout(base["transformer"], base_layout), folder / "base.safetensors")
    variant_path = tm.save(layout(variant["transformer"], variant_layout), folder / "variant.safetensors")
    return lc.Pair(tiny, base, variant, base_path, variant_path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_torch_thread):
    return make_pair(tmp_path_factory.mktemp("wan"))


def test_diffusers_format_loads_exactly_in_diffusers(pair, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(pair.base_path, pair.variant_path, out, format="diffusers")
    assert result.architecture == "wan" and not result.warnings
    lora = lc.check_report_matches_file(result, out)
    assert all(k.startswith("transformer.") for k in lora)
    assert lora["transformer.patch_embedding.lora_A.weight"].shape[1:] == (36, 1, 2, 2)
    written = lc.written_params(pair.model, result)
    lc.assert_coverage(pair, written, ("scale_shift_table",))  # a parameter table: no diffusers module
    transformer = pair.model.copy_with(pair.base).components["transformer"]
    pipeline = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=None)
    messages, injected = lc.diffusers_load(pipeline, out, {"transformer": transformer})
    assert not lc.key_complaints(messages), messages
    lc.assert_injected(injected, written, len(lc.lora_module_names(lora)), "diffusers")
    pipeline.fuse_lora()
    checked = lc.assert_weights(pair, {"transformer": lc.clean_state(transformer)}, written, "diffusers")
    assert checked == len(result.report.layers)


def comfy_key_map(model_keys):
    """ComfyUI's generic map (comfy/lora.py model_lora_keys_unet, copied by Forge Neo's
    modules_forge/packages/comfy/lora.py): the only entries a Wan model gets."""
    key_map = {}
    for key in model_keys:
        full = "diffusion_model." + key
        if key.endswith(".weight"):
            key_map["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = full
            key_map[full[: -len(".weight")]] = full
        else:
            key_map[full] = full
    return key_map


def comfy_apply(lora, checkpoint):
    """ComfyUI's / Forge Neo's application: one patch per weight key, up.flatten(1) @
    down.flatten(1) reshaped to the weight (conv kernels, 3-D tables), scale alpha/rank."""
    key_map = comfy_key_map(checkpoint)
    patched = {k: v.clone().double() for k, v in checkpoint.items()}
    matched, patches = set(), {}
    for module in lc.lora_module_names(lora):
        target = key_map.get(module)
        if target is None:
            continue
        peft = module + ".lora_B.weight" in lora
        up = lora[module + (".lora_B.weight" if peft else ".lora_up.weight")].double()
        down = lora[module + (".lora_A.weight" if peft else ".lora_down.weight")].double()
        alpha = lora.get(module + ".alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        patches[target.removeprefix("diffusion_model.")] = scale * (up.flatten(1) @ down.flatten(1))
        matched.add(module)
    for key, delta in patches.items():  # add_patches: one patch per weight key
        patched[key] += delta.reshape(patched[key].shape)
    return patched, matched


@pytest.mark.parametrize("fmt", ["auto", "neo", "kohya"])
def test_default_and_kohya_formats_apply_exactly_the_comfyui_way(pair, tmp_path, fmt):
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(pair.base_path, pair.variant_path, out, format=fmt)
    assert result.report.format == ("kohya" if fmt == "kohya" else "diffusion_model")
    lora = lc.check_report_matches_file(result, out)
    modules = lc.lora_module_names(lora)
    base = to_original_layout(pair.base["transformer"])
    variant = to_original_layout(pair.variant["transformer"])
    patched, matched = comfy_apply(lora, base)
    assert matched == modules, f"unmatched: {sorted(modules - matched)[:5]}"
    expected = {k for k, v in base.items() if v.ndim >= 2 and (fmt != "kohya" or k.endswith(".weight"))}
    assert {layer.key for layer in result.report.layers} == expected
    assert "patch_embedding.weight" in expected and ("blocks.0.modulation" in expected) == (fmt != "kohya")
    errors = []
    for key, value in patched.items():
        delta = (variant[key].double() - base[key].double()).norm()
        if key not in expected or delta == 0:
            assert torch.equal(value, base[key].double()), key
            continue
        error = float((value - variant[key].double()).norm() / delta)
        if not error < lc.DELTA_TOLERANCE:
            errors.append(f"{key}: {error:.3g}")
    assert not errors, errors[:6]


def test_layouts_give_the_same_lora(pair, tmp_path):
    mixed = make_pair(tmp_path / "mixed", base_layout="diffusers", variant_layout="original", prefix="")
    aio = make_pair(tmp_path / "aio", prefix=ALL_IN_ONE)
    lc.run_extract(pair.base_path, pair.variant_path, tmp_path / "a.safetensors")
    lc.run_extract(mixed.base_path, mixed.variant_path, tmp_path / "b.safetensors")
    lc.run_extract(aio.base_path, aio.variant_path, tmp_path / "c.safetensors")
    a, b, c = (load_file(str(tmp_path / f"{n}.safetensors")) for n in "abc")
    assert set(a) == set(b) == set(c)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) and torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_metadata_and_summary(pair, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(pair.base_path, pair.variant_path, out)
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    # musubi-tuner's values (ARCHITECTURE_WAN_FULL, sai_model_spec ARCH_WAN + "/lora")
    assert metadata["ss_base_model_version"] == "wan" and metadata["modelspec.architecture"] == "wan2.1/lora"
    assert metadata["ckpt2lora_architecture"] == "wan" and "ckpt2lora_expert" not in metadata
    summary = result.report.summary_text()
    assert "L1 (blk 0-0)" in summary and "XAttn" in summary and "patch_embedding" in summary


# -- bad input and the two experts ------------------------------------------------------------------


def t2v_pair(folder, seed, **config):
    """A tiny T2V-shaped pair (no CLIP image input); ``config`` changes its shape."""
    small = {**TINY, "in_channels": 16, "image_dim": None, "added_kv_proj_dim": None, **config}
    base = tm.randomize_(WanTransformer3DModel(**small), seed).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    base_path = tm.save(to_original_layout(base), folder / "base.safetensors")
    variant_path = tm.save(to_original_layout(tm.make_variant(base, seed=seed + 1)), folder / "variant.safetensors")
    return base_path, variant_path


def test_t2v_against_i2v_is_refused_by_name(tmp_path, pair):
    _, t2v = t2v_pair(tmp_path / "t2v", seed=2)
    with pytest.raises(UserError, match=r"is Wan 2.1/2.2 32-wide I2V \(CLIP image input\) but the variant variant.safetensors "
                       r"is Wan 2.1/2.2 32-wide T2V; pick a variant derived from the base"):
        lc.run_extract(pair.base_path, t2v, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_5b_against_14b_is_refused_by_name(tmp_path, monkeypatch):
    from lib_ckpt2lora.architectures import wan

    # tiny stand-ins read as the real sizes (the full-size titles are checked above)
    monkeypatch.setattr(wan, "SIZES", {32: "14B", 48: "5B"})
    base, _ = t2v_pair(tmp_path / "14b", seed=2)
    _, variant = t2v_pair(tmp_path / "5b", seed=4, num_attention_heads=3, in_channels=48, out_channels=48)
    with pytest.raises(UserError, match=r"The base base.safetensors is Wan 2.1/2.2 14B T2V but the variant "
                       r"variant.safetensors is Wan 2.1/2.2 5B TI2V; pick a variant derived from the base"):
        lc.run_extract(base, variant, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_expert_is_refused_for_a_model_without_experts(pair, tmp_path):
    with pytest.raises(UserError, match=r"--expert names one of Wan 2.2 A14B's two expert files, but the base base.safetensors "
                       r"is Wan 2.1/2.2 32-wide I2V"):
        lc.run_extract(pair.base_path, pair.variant_path, tmp_path / "x.safetensors", expert="low")


def test_mixed_experts_are_named_in_the_not_derived_warning(tmp_path):
    # a "variant" that changed by far more than a fine-tune: what a high-noise base with a
    # low-noise variant looks like (both experts share every shape, so only the delta tells)
    mixed = make_pair(tmp_path / "mixed", scale=1.0)
    result = lc.run_extract(mixed.base_path, mixed.variant_path, tmp_path / "x.safetensors", rank=1)
    assert any("does not look derived from the base" in w and "high-noise expert and a low-noise one do not pair" in w
               for w in result.warnings), result.warnings


def test_two_experts_in_one_cli_run(tmp_path, monkeypatch, capsys):
    from lib_ckpt2lora.architectures import wan

    monkeypatch.setattr(wan, "SIZES", {32: "14B"})  # the tiny T2V model stands in for the 14B experts
    high_base, high_variant = t2v_pair(tmp_path / "high", seed=3)
    low_base, low_variant = t2v_pair(tmp_path / "low", seed=5)
    out = tmp_path / "speed.safetensors"
    argv = ["--base", str(high_base), "--variant", str(high_variant), "--base-low", str(low_base),
            "--variant-low", str(low_variant), "--out", str(out), "--min-dim", "1", "--rank-thresh", "0.9999"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for expert, variant_path in (("high", high_variant), ("low", low_variant)):
        path = tmp_path / f"speed_{expert}.safetensors"
        assert f"Saved {path}" in printed
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        assert metadata["ckpt2lora_expert"] == f"{expert}_noise" and metadata["ss_output_name"] == f"speed_{expert}"
        assert metadata["ckpt2lora_variant"] == variant_path.name
        assert json.loads(metadata["ckpt2lora_options"])["expert"] == expert
    assert not out.exists()
    # a wrong low-noise file fails before the high-noise LoRA is written
    (tmp_path / "speed_high.safetensors").unlink()
    (tmp_path / "speed_low.safetensors").unlink()
    argv[argv.index("--variant-low") + 1] = str(tmp_path / "missing.safetensors")
    assert cli.main(argv) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "speed_high.safetensors").exists()
    half = ["--base", str(high_base), "--variant", str(high_variant), "--variant-low", str(low_variant), "--out", str(out)]
    assert cli.main(half) == 2
    assert "Give both --base-low and --variant-low" in capsys.readouterr().err


def test_two_experts_stopped_during_the_low_noise_run_names_the_saved_file(tmp_path, monkeypatch, capsys):
    import importlib

    from lib_ckpt2lora.architectures import wan
    from lib_ckpt2lora.errors import SignalFlag

    extract_module = importlib.import_module("lib_ckpt2lora.extract")  # the package's `extract` is the function

    monkeypatch.setattr(wan, "SIZES", {32: "14B"})
    high_base, high_variant = t2v_pair(tmp_path / "high", seed=3)
    low_base, low_variant = t2v_pair(tmp_path / "low", seed=5)
    out = tmp_path / "speed.safetensors"
    stop = SignalFlag()  # as the command's own
    real_extract, calls = extract_module.extract, []

    def stop_before_the_second(opts, **kwargs):
        calls.append(opts.expert)
        if len(calls) == 2:
            stop.set()  # as a Ctrl-C between the experts would
        return real_extract(opts, **kwargs)

    monkeypatch.setattr(extract_module, "extract", stop_before_the_second)
    argv = ["--base", str(high_base), "--variant", str(high_variant), "--base-low", str(low_base),
            "--variant-low", str(low_variant), "--out", str(out), "--min-dim", "1"]
    assert cli.main(argv, stop=stop) == 130
    captured = capsys.readouterr()
    high = tmp_path / "speed_high.safetensors"
    assert calls == ["high", "low"] and high.exists() and not (tmp_path / "speed_low.safetensors").exists()
    assert f"Saved {high}" in captured.out
    assert f"Interrupted; already saved and complete: {high}." in captured.err
    assert "nothing was written" not in captured.err


def test_sidecar_names_neos_wan_preset():
    import types

    from lib_ckpt2lora.ui import sidecar

    # Forge Neo: extensions-builtin/sd_forge_lora/network.py SD_VERSION = ["Unknown"] + PresetArch names
    neo = types.SimpleNamespace(SD_VERSION=["Unknown", "sd", "xl", "flux", "klein", "qwen", "lumina", "zit", "wan", "anima"])
    assert sidecar.sd_version_for("wan", neo) == "wan"


@pytest.mark.parametrize("fmt", ["auto", "kohya", "diffusers"])
def test_a_wan_lora_of_each_format_is_read_back_as_a_variant(pair, tmp_path, fmt):
    """Wan LoRAs as users have them (diffusion-pipe / lightx2v ``diffusion_model.``, musubi
    ``lora_unet_``, diffusers ``transformer.``) are read as a variant: re-extracting one
    gives a default-format LoRA that applies to the same weights, the ComfyUI way."""
    first = tmp_path / "first.safetensors"
    lc.run_extract(pair.base_path, pair.variant_path, first, format=fmt)
    again = tmp_path / "again.safetensors"
    result = lc.run_extract(pair.base_path, first, again)
    base = to_original_layout(pair.base["transformer"])
    from_first, _ = comfy_apply(load_file(str(first)) if fmt != "diffusers" else {}, base)
    if fmt == "diffusers":  # rebuild the first LoRA's weights from diffusers' names
        lora = load_file(str(first))
        for key in list(from_first):
            module = "transformer." + wan_diffusers_module(key)
            if key.endswith(".weight") and module + ".lora_A.weight" in lora:
                up, down = lora[module + ".lora_B.weight"].double(), lora[module + ".lora_A.weight"].double()
                from_first[key] = base[key].double() + (up.flatten(1) @ down.flatten(1)).reshape(base[key].shape)
    from_again, matched = comfy_apply(load_file(str(again)), base)
    assert matched == lc.lora_module_names(load_file(str(again))) and len(result.report.layers) > 20
    for key, value in from_first.items():
        change = (value - base[key].double()).norm()
        if change > 0:
            assert float((from_again[key] - value).norm() / change) < lc.DELTA_TOLERANCE, key


def wan_diffusers_module(original_key):
    from lib_ckpt2lora.architectures.wan import to_diffusers

    return to_diffusers(original_key.rpartition(".")[0])
