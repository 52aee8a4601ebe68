"""Z-Image LoRAs from the engine, loaded by diffusers' real Z-Image LoRA loader.

A tiny real ``ZImageTransformer2DModel`` and a variant with a known rank-1..4 delta on
every weight; the engine's LoRA (every layer, enough rank, fp32) must load with
``ZImagePipeline.load_lora_weights`` + ``fuse_lora`` into weights equal to the
variant's, with every module in the file injected and no loader complaint. Both input
layouts (original fused qkv, diffusers split) and both prefixes (bare, all-in-one) must
give the same LoRA, bit for bit.

Also run by tests/run_diffusers_versions.sh under diffusers 0.36.0 and 0.37.0: keep
this file to what those versions have.
"""

from __future__ import annotations

import loader_checks as lc
import pytest
import tiny_models as tm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUTS = {
    "original": dict(layout="original", prefix=""),
    "original-all-in-one": dict(layout="original", prefix=tm.ZIMAGE_ALL_IN_ONE),
    "diffusers": dict(layout="diffusers", prefix=""),
    "diffusers-all-in-one": dict(layout="diffusers", prefix=tm.ZIMAGE_ALL_IN_ONE),
}
# 2-D tensors no LoRA module can address: the pad tokens are parameters, not layers.
NOT_LORA = ("pad_token",)


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return tm.zimage_model(seed=0)


@pytest.fixture(scope="module")
def pairs(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage")
    return {name: lc.make_pair(model, root / name, **layout) for name, layout in LAYOUTS.items()}


@pytest.fixture(scope="module")
def pair(pairs):
    return pairs["original"]


@pytest.fixture(scope="module")
def extracted(pair, tmp_path_factory):
    """format -> (result, LoRA path), each format extracted once from the original layout."""
    root = tmp_path_factory.mktemp("zimage_loras")
    cache = {}

    def get(fmt="auto", **options):
        key = (fmt, tuple(sorted(options.items())))
        if key not in cache:
            out = root / f"lora_{fmt}_{len(cache)}.safetensors"
            cache[key] = (lc.run_extract(pair.base_path, pair.variant_path, out, format=fmt, **options), out)
        return cache[key]

    return get


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


def load_into_diffusers(pair, lora_path):
    from diffusers import ZImagePipeline

    transformer = pair.model.copy_with(pair.base).components["transformer"]
    pipeline = ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    messages, injected = lc.diffusers_load(pipeline, lora_path, {"transformer": transformer})
    return pipeline, transformer, messages, injected


def check_loads_exactly(pair, result, lora_path):
    lora = lc.check_report_matches_file(result, lora_path)
    written = lc.written_params(pair.model, result)
    lc.assert_coverage(pair, written, NOT_LORA)
    pipeline, transformer, messages, injected = load_into_diffusers(pair, lora_path)
    assert not lc.key_complaints(messages), messages
    lc.assert_injected(injected, written, len(lc.lora_module_names(lora)), "diffusers")
    pipeline.fuse_lora()
    checked = lc.assert_weights(pair, {"transformer": lc.clean_state(transformer)}, written, "diffusers")
    assert checked == len(result.report.layers)
    return lora


# -- the test models' layouts ----------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", tm.ZIMAGE_ALL_IN_ONE])
def test_original_layout_matches_diffusers_converter(model, prefix):
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    state = model.states()["transformer"]
    checkpoint = tm.zimage_checkpoint(state, "original", prefix)
    # (diffusers < 0.37's converter does not strip the all-in-one prefix itself)
    other = ("text_encoders.", "vae.")
    checkpoint = {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix) and not k.startswith(other)}
    assert any(k.endswith(".attention.qkv.weight") for k in checkpoint)
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["original", "original-all-in-one"])
def test_original_layout_loads_with_from_single_file(pairs, name, tmp_path):
    import diffusers
    from diffusers import ZImageTransformer2DModel

    if name.endswith("all-in-one") and _version(diffusers.__version__) < (0, 37):
        pytest.skip("diffusers 0.36's Z-Image single-file converter keeps the model.diffusion_model. prefix")
    pair = pairs[name]
    pair.model.components["transformer"].save_config(tmp_path / "transformer")
    with lc.loader_messages():
        loaded = ZImageTransformer2DModel.from_single_file(
            str(pair.base_path), config=str(tmp_path), subfolder="transformer", local_files_only=True
        )
    state = loaded.state_dict()
    assert set(state) == set(pair.base["transformer"])
    assert all(torch.equal(state[k], v) for k, v in pair.base["transformer"].items())


# -- the engine's LoRA in diffusers ------------------------------------------------------------


def test_default_format_loads_exactly_in_diffusers(pair, extracted):
    result, path = extracted()
    assert result.architecture == "zimage"
    lora = check_loads_exactly(pair, result, path)
    # The default style: ComfyUI's prefix on diffusers module names, peft factors (alphas:
    # see test_lora_has_what_diffusers_036_and_037_need).
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for k in lora)
    assert any(".attention.to_q." in k for k in lora) and not any(".qkv." in k for k in lora)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "z_image"


@pytest.mark.parametrize("fmt", ["auto", "diffusers"])
def test_lora_has_what_diffusers_036_and_037_need(extracted, fmt):
    """What diffusers 0.36.0 / 0.37.0 need to load a Z-Image lora_A/lora_B LoRA exactly
    (their sources; the loads themselves run in tests/run_diffusers_versions.sh):

    1. A ``diffusion_model.`` prefix sends the file through the non-diffusers converter,
       which in 0.37.0 pops ``<module>.alpha`` for every lora_A with no default
       (lora_conversion_utils.py, get_alpha_scales: ``state_dict.pop(alpha_key).item()``:
       KeyError without it); 0.36.0 drops such alphas unread (scale 1). So under that
       prefix every module needs an alpha, equal to its rank.
    2. With no alpha left (0.36 drops them, 0.37 bakes them into the factors), both build
       peft's LoraConfig in utils/peft_utils.py get_peft_kwargs as ``r = lora_alpha = <the
       first module's rank>`` plus a rank_pattern for modules of other ranks and no
       alpha_pattern: every such module is scaled by first_rank / own_rank, silently.
       Unless the safetensors header carries ``lora_adapter_metadata`` (the LoraConfig
       diffusers itself saves: ``transformer.r``, ``transformer.lora_alpha``,
       ``transformer.rank_pattern``, ``transformer.alpha_pattern``,
       ``transformer.target_modules``), which both use as is, the ranks must all be equal.
    """
    import json

    _, path = extracted(fmt)
    lora = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata() or {}
    modules = lc.lora_module_names(lora)
    prefix = "diffusion_model." if any(k.startswith("diffusion_model.") for k in lora) else "transformer."
    if prefix == "diffusion_model.":
        no_alpha = [m for m in modules if m + ".alpha" not in lora]
        assert not no_alpha, f"{len(no_alpha)} modules without .alpha (KeyError in diffusers 0.37.0), e.g. {no_alpha[:3]}"
        wrong = [m for m in modules if float(lora[m + ".alpha"]) != lora[m + ".lora_A.weight"].shape[0]]
        assert not wrong, f"alpha != rank (diffusers 0.36.0 ignores alpha) for {wrong[:3]}"
    ranks = {m[len(prefix) :]: lora[m + ".lora_A.weight"].shape[0] for m in modules}
    raw = header.get("lora_adapter_metadata")
    if raw is None:
        assert len(set(ranks.values())) == 1, (
            f"ranks {sorted(set(ranks.values()))} vary and there is no lora_adapter_metadata: diffusers 0.36/0.37 "
            "scale each module by first_rank / own_rank"
        )
        return
    config = json.loads(raw)
    r, alpha = config["transformer.r"], config["transformer.lora_alpha"]
    rank_pattern, alpha_pattern = config.get("transformer.rank_pattern", {}), config.get("transformer.alpha_pattern", {})
    assert set(config.get("transformer.target_modules", [])) == set(ranks)
    for module, rank in ranks.items():
        assert rank_pattern.get(module, r) == rank, f"{module}: LoraConfig rank {rank_pattern.get(module, r)} != {rank}"
        assert alpha_pattern.get(module, alpha) == rank, f"{module}: LoraConfig alpha/rank != 1"


def test_fixed_rank_loads_exactly_in_diffusers(pair, extracted):
    result, path = extracted(rank=4)
    assert {layer.rank for layer in result.report.layers} == {4}
    check_loads_exactly(pair, result, path)


def test_diffusers_format_loads_exactly_in_diffusers(pair, extracted):
    result, path = extracted("diffusers")
    lora = check_loads_exactly(pair, result, path)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "original"] + ["mixed"])
def test_every_input_layout_gives_the_same_lora(pairs, pair, extracted, name, tmp_path):
    """Original/diffusers layout, bare/all-in-one, and a base and variant in different layouts."""
    _, reference_path = extracted()
    if name == "mixed":
        base, variant = pairs["original-all-in-one"].base_path, pairs["diffusers"].variant_path
    else:
        base, variant = pairs[name].base_path, pairs[name].variant_path
    result = lc.run_extract(base, variant, tmp_path / "lora.safetensors")
    assert result.architecture == "zimage"
    reference, lora = load_file(str(reference_path)), load_file(str(tmp_path / "lora.safetensors"))
    assert set(lora) == set(reference)
    different = [k for k in reference if not torch.equal(lora[k], reference[k])]
    assert not different, f"{len(different)} tensors differ from the original-layout LoRA, e.g. {different[:4]}"
    check_loads_exactly(pair, result, tmp_path / "lora.safetensors")


def test_forward_pass_with_lora_matches_variant(pair, extracted):
    """The LoRA applied at run time (peft, unfused) gives the variant's output (the variant's
    weights where the LoRA reaches; its pad tokens, which no LoRA carries, are the base's)."""
    result, path = extracted()
    target = lc.lora_reachable_states(pair, lc.written_params(pair.model, result))
    generator = torch.Generator().manual_seed(7)
    x = [torch.randn(16, 1, 8, 8, generator=generator)]
    caption = [torch.randn(7, tm.ZIMAGE_CONFIG["cap_feat_dim"], generator=generator)]
    t = torch.tensor([0.4])

    def run(transformer):
        with torch.no_grad():
            return transformer([v.clone() for v in x], t, [c.clone() for c in caption]).sample[0]

    base_out = run(pair.model.copy_with(pair.base).components["transformer"])
    variant_out = run(pair.model.copy_with(target).components["transformer"])
    _, transformer, messages, _ = load_into_diffusers(pair, path)
    lora_out = run(transformer)
    assert not lc.key_complaints(messages), messages
    assert lc.relative_output_error(lora_out, variant_out, base_out) < 1e-3


# -- the comfy format (ComfyUI's own extractor style) -------------------------------------------

COMFY_DROPPED_BY_DIFFUSERS = (".attention.qkv", "x_embedder", "final_layer.")


def test_comfy_format_is_the_original_layout_with_alpha(pair, extracted):
    """Original module names, fused qkv, kohya factors and alpha; applied as ComfyUI does
    (W += alpha/rank * up @ down on the original-layout key) it reproduces the variant."""
    result, path = extracted("comfy")
    lora = lc.check_report_matches_file(result, path)
    base = tm.zimage_checkpoint(pair.base["transformer"], "original")
    variant = tm.zimage_checkpoint(pair.variant["transformer"], "original")
    modules = lc.lora_module_names(lora)
    assert any(m.endswith(".attention.qkv") for m in modules)
    assert all(m.startswith("diffusion_model.") for m in modules)
    applied = set()
    for module in modules:
        key = module[len("diffusion_model.") :] + ".weight"
        assert key in base, f"comfy LoRA module {module} names no original-layout weight"
        down, up = lora[module + ".lora_down.weight"], lora[module + ".lora_up.weight"]
        scale = float(lora[module + ".alpha"]) / down.shape[0]
        delta = scale * (up.flatten(1) @ down.flatten(1)).reshape(base[key].shape)
        true_delta = variant[key] - base[key]
        error = float(torch.linalg.vector_norm(delta - true_delta) / torch.linalg.vector_norm(true_delta))
        assert error < lc.DELTA_TOLERANCE, f"{module}: relative delta error {error:.3g}"
        applied.add(key)
    expected = {k for k, v in base.items() if v.ndim >= 2 and not any(part in k for part in NOT_LORA)}
    assert applied == expected


def test_comfy_qkv_is_block_diagonal_with_rank_n_per_part(pair, extracted):
    """--format comfy (and neo): the fused qkv module is the split q, k, v LoRAs side by side,
    up = blockdiag(up_q, up_k, up_v), down = [down_q; down_k; down_v]: --rank 2 gives a
    rank-6 module whose q rows use only q's columns (and so on), and whose row blocks
    equal the split format's products at the same rank."""
    _, fused_path = extracted("comfy", rank=2)
    _, split_path = extracted("auto", rank=2)
    fused, split = load_file(str(fused_path)), load_file(str(split_path))
    dim = tm.ZIMAGE_CONFIG["dim"]
    for block in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.1"):
        module = f"diffusion_model.{block}.attention.qkv"
        down, up = fused[module + ".lora_down.weight"], fused[module + ".lora_up.weight"]
        assert down.shape[0] == 6 and float(fused[module + ".alpha"]) == 2.0
        scale = float(fused[module + ".alpha"]) / down.shape[0]
        for i, name in enumerate("qkv"):
            rows, columns = slice(i * dim, (i + 1) * dim), slice(2 * i, 2 * i + 2)
            outside = up[rows].clone()
            outside[:, columns] = 0
            assert not outside.any(), f"{module}: {name} rows use other parts' columns"
            part = f"diffusion_model.{block}.attention.to_{name}"
            want = split[part + ".lora_B.weight"] @ split[part + ".lora_A.weight"]
            got = scale * up[rows] @ down
            assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()) + 1e-9), f"{module} {name}"


def test_comfy_format_in_diffusers_drops_qkv_and_embedders(pair, extracted):
    """diffusers' Z-Image LoRA converter does not map ``qkv`` in kohya spelling, ``x_embedder``
    or ``final_layer`` (it knows fused qkv only as ``.lora.down``, and the embedders only by
    their diffusers names): those keys are dropped with an 'unexpected keys' warning, the
    rest loads exactly. This is why comfy is not the default (SPEC section 4)."""
    result, path = extracted("comfy")
    lora = load_file(str(path))
    pipeline, transformer, messages, injected = load_into_diffusers(pair, path)
    complaints = " ".join(lc.key_complaints(messages))
    dropped = [layer for layer in result.report.layers if any(p in layer.name for p in COMFY_DROPPED_BY_DIFFUSERS)]
    assert {layer.name.rsplit(".", 1)[-1] for layer in dropped} >= {"qkv", "linear", "1"}
    for layer in dropped:
        stem = layer.name[len("diffusion_model.") :]
        # (diffusers < 0.42 spells the keys with the adapter name: qkv.lora_A.default_0.weight)
        assert f"{stem}.lora_A." in complaints, f"{layer.name} was dropped without a warning"
    kept = [layer for layer in result.report.layers if layer not in dropped]
    written = {"transformer": {pair.model.canonical[layer.key][1] for layer in kept}}
    lc.assert_injected(injected, written, len(lc.lora_module_names(lora)) - len(dropped), "diffusers")
    import diffusers

    if _version(diffusers.__version__) < (0, 42):
        return  # (older diffusers also mis-scale the kept modules when ranks vary: see above)
    pipeline.fuse_lora()
    # the kept modules land exactly; the dropped ones leave their weights at the base's
    assert lc.assert_weights(pair, {"transformer": lc.clean_state(transformer)}, written, "diffusers") == len(kept)
