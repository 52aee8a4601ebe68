"""``--detail``: the residual (delta - main LoRA) extracted again into <out>_detail.safetensors.

On a delta with a long spectrum and a small rank cap, main + detail must reproduce the
delta strictly better than main alone (in fact as well as the best approximation of twice
the rank), ``--detail-scale 2`` must double the detail file's effective delta, and the
detail file's metadata must mark it as detail. The files are also loaded by diffusers.
"""

from __future__ import annotations

import json

import pytest
import tiny_models as tm
import torch
from _feature_models import fused_zimage, run_extract, torch_threads
from safetensors import safe_open

RANK_MAX = 4
SPECTRUM = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def long_spectrum(shape, generator, size):
    """A delta with singular values 1, 1/2, ..., 1/32 (scaled to norm ``size``)."""
    rows, cols = shape
    u = torch.linalg.qr(torch.randn(rows, SPECTRUM, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, SPECTRUM, generator=generator, dtype=torch.float64))[0]
    s = 1.0 / torch.arange(1, SPECTRUM + 1, dtype=torch.float64)
    delta = (u * s) @ v.T
    return (delta * (size / delta.norm())).float()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detail")
    state = {k: v.detach().clone() for k, v in tm.zimage_transformer(0).state_dict().items()}
    generator = torch.Generator().manual_seed(41)
    deltas = {
        key: long_spectrum(tuple(w.shape), generator, 0.05 * float(w.norm()))
        for key, w in sorted(state.items())
        if w.dim() == 2 and min(w.shape) >= 32
    }
    variant = {k: (v + deltas[k] if k in deltas else v) for k, v in state.items()}
    base = tm.save(tm.zimage_checkpoint(state), folder / "base.safetensors")
    changed = tm.save(tm.zimage_checkpoint(variant), folder / "variant.safetensors")
    return dict(folder=folder, state=state, variant=variant, deltas=deltas, base=base, changed=changed)


def module_of(key: str) -> str:
    return "diffusion_model." + key[: -len(".weight")]


def dense(lora, module):
    return lora[module + ".lora_B.weight"] @ lora[module + ".lora_A.weight"]


def detail_file(folder, stem):
    from safetensors.torch import load_file

    path = folder / f"{stem}_detail.safetensors"
    return path, load_file(str(path))


def test_main_plus_detail_beats_main_alone(pair):
    folder = pair["folder"]
    result, main = run_extract(folder, pair["base"], pair["changed"], "lora", rank_max=RANK_MAX, detail=True)
    path, detail = detail_file(folder, "lora")
    assert result.outputs == [folder / "lora.safetensors", path]
    for key, delta in pair["deltas"].items():
        module = module_of(key)
        assert main[module + ".lora_A.weight"].shape[0] == RANK_MAX
        assert detail[module + ".lora_A.weight"].shape[0] == RANK_MAX
        main_error = float((delta - dense(main, module)).norm())
        both_error = float((delta - dense(main, module) - dense(detail, module)).norm())
        assert both_error < 0.9 * main_error, key
        # ...and main + detail is the best approximation of rank 2 * RANK_MAX
        s = torch.linalg.svdvals(delta.double())
        best = float(s[2 * RANK_MAX :].pow(2).sum().sqrt())
        assert both_error <= best * (1 + 1e-3) + 1e-7, key


def test_main_and_detail_load_in_diffusers(pair):
    folder = pair["folder"]
    _, main = run_extract(folder, pair["base"], pair["changed"], "lora_loaded", rank_max=RANK_MAX, detail=True)
    _, detail = detail_file(folder, "lora_loaded")
    after_main = fused_zimage(pair["state"], main)
    after_both = fused_zimage(after_main, detail)
    for key in pair["deltas"]:
        main_error = float((after_main[key] - pair["variant"][key]).norm())
        both_error = float((after_both[key] - pair["variant"][key]).norm())
        assert both_error < 0.9 * main_error, key


def test_detail_scale_doubles_the_detail_delta(pair):
    folder = pair["folder"]
    _, main_one = run_extract(folder, pair["base"], pair["changed"], "scale_one", rank_max=RANK_MAX, detail=True)
    _, main_two = run_extract(
        folder, pair["base"], pair["changed"], "scale_two", rank_max=RANK_MAX, detail=True, detail_scale=2.0
    )
    _, one = detail_file(folder, "scale_one")
    _, two = detail_file(folder, "scale_two")
    for key in pair["deltas"]:
        module = module_of(key)
        assert torch.allclose(dense(main_two, module), dense(main_one, module), rtol=1e-5, atol=1e-8), key
        assert torch.allclose(dense(two, module), 2 * dense(one, module), rtol=1e-4, atol=1e-8), key


def test_detail_metadata_marks_it_as_detail(pair):
    folder = pair["folder"]
    run_extract(folder, pair["base"], pair["changed"], "marked", rank_max=RANK_MAX, detail=True, detail_scale=2.0)
    with safe_open(str(folder / "marked.safetensors"), "pt") as handle:
        main_meta = handle.metadata()
    with safe_open(str(folder / "marked_detail.safetensors"), "pt") as handle:
        detail_meta = handle.metadata()
    assert main_meta["ckpt2lora_kind"] == "main"
    assert detail_meta["ckpt2lora_kind"] == "detail"
    assert detail_meta["ss_output_name"] == "marked_detail"
    assert json.loads(detail_meta["ckpt2lora_options"])["detail_scale"] == 2.0
    assert detail_meta["ss_base_model_version"] == "z_image"
