"""Options that used to be silently dropped or half-applied (issue 10 §4).

- ``--checkpoint --detail`` writes the detail LoRA of the residual beside the checkpoint,
  and checkpoint + detail reproduces the variant better than the checkpoint alone;
- SDXL te2 attention keeps all four of q/k/v/out whatever drops a member (zero delta,
  NaN, --exclude, a LoRA variant with only some of them): the missing ones are written
  as zero, with a warning naming them;
- the shape-mismatch warning names the file and shape that differ (also --variant2);
- the tab's messages name the tab's controls, never CLI flags.

Realistic data where the numbers matter: 1024-wide weights, noisy full-rank deltas
rounded to bf16, so the randomized SVD path runs.
"""

from __future__ import annotations

import json
import re

import pytest
import tiny_models as tm
import torch
from _feature_models import save_lora, silent_log, torch_threads
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_ckpt2lora.cli import main
from lib_ckpt2lora.extract import extract
from lib_ckpt2lora.options import ExtractOptions

WIDE = 1024
TE2 = "conditioner.embedders.1.model.transformer.resblocks."
TE2_LORA = "lora_te2_text_model_encoder_layers_{}_self_attn_{}_proj"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def noisy_delta(rows: int, cols: int, generator: torch.Generator, size: float) -> torch.Tensor:
    """A fine-tune-like delta: a decaying spectrum plus 30% dense noise (full rank)."""
    k = 48
    u = torch.linalg.qr(torch.randn(rows, k, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=generator))[0]
    low = (u * (0.9 ** torch.arange(k))) @ v.T
    noise = torch.randn(rows, cols, generator=generator)
    delta = low / low.norm() + 0.3 * noise / noise.norm()
    return delta * (size / delta.norm())


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory):
    """A generic (non-SD) model of two 1024-wide bf16 weights and a noisy bf16 variant."""
    folder = tmp_path_factory.mktemp("wide")
    generator = torch.Generator().manual_seed(7)
    base = {
        "blocks.0.proj.weight": torch.randn(WIDE, WIDE, generator=generator) * 0.02,
        "blocks.1.proj.weight": torch.randn(WIDE, 768, generator=generator) * 0.02,
    }
    base = {k: v.bfloat16() for k, v in base.items()}
    variant = {
        k: (v.float() + noisy_delta(*v.shape, generator, 0.05 * float(v.float().norm()))).bfloat16() for k, v in base.items()
    }
    save_file(base, str(folder / "base.safetensors"))
    save_file(variant, str(folder / "variant.safetensors"))
    return dict(folder=folder, base=base, variant=variant)


# -- --checkpoint --detail ----------------------------------------------------------------------


def test_checkpoint_detail_writes_the_residual_lora_beside_the_checkpoint(wide_pair, capsys):
    folder = wide_pair["folder"]
    out = folder / "lowrank.safetensors"
    detail_path = folder / "lowrank_detail.safetensors"
    code = main(
        ["--base", str(folder / "base.safetensors"), "--variant", str(folder / "variant.safetensors")]
        + ["--out", str(out), "--checkpoint", "--detail", "--rank-max", "8", "--save-dtype", "fp32"]
    )
    assert code == 0
    saved = capsys.readouterr().out
    assert str(out) in saved and str(detail_path) in saved
    checkpoint, detail = load_file(str(out)), load_file(str(detail_path))
    with safe_open(str(detail_path), "pt") as handle:
        assert handle.metadata()["ckpt2lora_kind"] == "detail"
    for key, base in wide_pair["base"].items():
        module = "diffusion_model." + key[: -len(".weight")]
        assert module + ".lora_down.weight" in detail, f"the detail LoRA has nothing for {key}"
        alpha = float(detail[module + ".alpha"])
        rank = detail[module + ".lora_down.weight"].shape[0]
        residual_lora = detail[module + ".lora_up.weight"] @ detail[module + ".lora_down.weight"] * alpha / rank
        truth = wide_pair["variant"][key].float() - base.float()
        low_rank = checkpoint[key].float() - base.float()
        error_alone = float((truth - low_rank).norm())
        error_with_detail = float((truth - low_rank - residual_lora).norm())
        # The detail is a rank-8 approximation of the residual: on this spectrum it takes
        # a clear part of what the checkpoint missed.
        assert error_with_detail < 0.97 * error_alone, (key, error_alone, error_with_detail)


def test_checkpoint_detail_fails_whole_when_the_detail_file_exists(wide_pair, capsys):
    folder = wide_pair["folder"]
    out = folder / "taken.safetensors"
    (folder / "taken_detail.safetensors").write_bytes(b"mine")
    code = main(
        ["--base", str(folder / "base.safetensors"), "--variant", str(folder / "variant.safetensors")]
        + ["--out", str(out), "--checkpoint", "--detail"]
    )
    assert code == 2
    assert "taken_detail.safetensors" in capsys.readouterr().err
    assert not out.exists()
    assert (folder / "taken_detail.safetensors").read_bytes() == b"mine"


# -- shape mismatch names the right file --------------------------------------------------------


def test_shape_mismatch_warning_names_the_second_variant_and_its_shape(wide_pair, tmp_path):
    folder = wide_pair["folder"]
    other = dict(wide_pair["variant"])
    other["blocks.1.proj.weight"] = torch.zeros(WIDE, 640, dtype=torch.bfloat16)
    save_file(other, str(tmp_path / "other.safetensors"))
    opts = ExtractOptions(
        base=folder / "base.safetensors",
        variant=folder / "variant.safetensors",
        variant2=tmp_path / "other.safetensors",
        out=tmp_path / "common.safetensors",
    )
    result = extract(opts, log=silent_log)
    [warning] = [w for w in result.warnings if "blocks.1.proj.weight" in w]
    assert "other.safetensors" in warning and f"[{WIDE}, 640]" in warning
    assert "variant.safetensors" not in warning.replace("other.safetensors", "")


# -- SDXL te2 attention: all four or the module is ignored by A1111 ------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("te2")
    model = tm.sdxl_model(0)
    base_states = model.states()
    base = tm.checkpoint_for(model, base_states)
    variant = tm.checkpoint_for(model, tm.variant_states(base_states))
    tm.save(base, folder / "base.safetensors")
    return dict(folder=folder, base=base, variant=variant)


def te2_groups(lora: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """layer index -> member -> dense up @ down * alpha / rank, for te2 attention modules."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name in lora:
        if name.startswith("lora_te2_") and "_self_attn_" in name and name.endswith(".lora_down.weight"):
            module = name[: -len(".lora_down.weight")]
            layer = module.split("_layers_")[1].split("_")[0]
            member = module.split("_self_attn_")[1][: -len("_proj")]
            down, up = lora[module + ".lora_down.weight"], lora[module + ".lora_up.weight"]
            # float32: torch 2.1 has no fp16 matmul on the CPU (AUTOMATIC1111 1.10's stack)
            groups.setdefault(layer, {})[member] = up.float() @ down.float() * float(lora[module + ".alpha"]) / down.shape[0]
    return groups


def variant_with(sdxl, change) -> dict[str, torch.Tensor]:
    variant = {k: v.clone() for k, v in sdxl["variant"].items()}
    change(variant)
    return variant


def k_rows(state, layer=0):
    weight = state[f"{TE2}{layer}.attn.in_proj_weight"]
    third = weight.shape[0] // 3
    return weight[third : 2 * third]


def _zero_k(sdxl):
    return variant_with(sdxl, lambda v: k_rows(v).copy_(k_rows(sdxl["base"]))), {}


def _nan_k(sdxl):
    return variant_with(sdxl, lambda v: k_rows(v).fill_(float("nan"))), {}


def _exclude_k(sdxl):
    return sdxl["variant"], {"exclude": "k_proj"}


CAUSES = {"zero delta": _zero_k, "NaN": _nan_k, "--exclude": _exclude_k}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_te2_attention_keeps_all_four_members(sdxl, tmp_path, cause):
    variant, options = CAUSES[cause](sdxl)
    variant_path = tm.save(variant, tmp_path / "variant.safetensors")
    out = tmp_path / "lora.safetensors"
    result = extract(
        ExtractOptions(base=sdxl["folder"] / "base.safetensors", variant=variant_path, out=out, min_dim=1, **options),
        log=silent_log,
    )
    groups = te2_groups(load_file(str(out)))
    assert groups and all(set(members) == {"q", "k", "v", "out"} for members in groups.values()), groups.keys()
    assert float(groups["0"]["k"].abs().max()) == 0.0  # the filled-in member changes nothing
    assert float(groups["0"]["q"].abs().max()) > 0.0  # and the others are there to be applied
    [warning] = [w for w in result.warnings if "A1111" in w]
    assert TE2_LORA.format(0, "k") in warning


def test_te2_attention_from_a_lora_with_only_q_and_v(sdxl, tmp_path):
    generator = torch.Generator().manual_seed(3)
    width = sdxl["base"][f"{TE2}0.attn.out_proj.weight"].shape[0]
    lora = {}
    for member in ("q", "v"):
        module = TE2_LORA.format(0, member)
        lora[module + ".lora_down.weight"] = torch.randn(2, width, generator=generator) * 0.1
        lora[module + ".lora_up.weight"] = torch.randn(width, 2, generator=generator) * 0.1
        lora[module + ".alpha"] = torch.tensor(2.0)
    variant = save_lora(lora, tmp_path / "partial_lora.safetensors")
    out = tmp_path / "out.safetensors"
    result = extract(
        ExtractOptions(base=sdxl["folder"] / "base.safetensors", variant=variant, out=out, min_dim=1, save_dtype="fp32"),
        log=silent_log,
    )
    groups = te2_groups(load_file(str(out)))
    assert set(groups) == {"0"} and set(groups["0"]) == {"q", "k", "v", "out"}
    for member in ("q", "v"):
        module = TE2_LORA.format(0, member)
        truth = lora[module + ".lora_up.weight"] @ lora[module + ".lora_down.weight"]
        assert torch.allclose(groups["0"][member], truth, atol=1e-5)
    assert float(groups["0"]["k"].abs().max()) == 0.0 and float(groups["0"]["out"].abs().max()) == 0.0
    assert any(TE2_LORA.format(0, "out") in w for w in result.warnings)


def test_te2_zero_members_load_in_diffusers(sdxl, tmp_path):
    """The filled-in zero modules are accepted by a real loader (diffusers' kohya path)."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionXLPipeline

    variant_path = tm.save(_zero_k(sdxl)[0], tmp_path / "variant.safetensors")
    out = tmp_path / "lora.safetensors"
    extract(ExtractOptions(base=sdxl["folder"] / "base.safetensors", variant=variant_path, out=out, min_dim=1), log=silent_log)
    model = tm.sdxl_model(0)
    pipeline = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=model.components["text_encoder"],
        text_encoder_2=model.components["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=None,
        unet=model.components["unet"],
        scheduler=None,
    )
    pipeline.load_lora_weights(str(out))
    injected = {n for n, _ in model.components["text_encoder_2"].named_modules() if n.endswith("k_proj.lora_A")}
    assert any("layers.0.self_attn.k_proj" in name for name in injected)


# -- the tab's messages -------------------------------------------------------------------------


def test_tab_messages_name_the_tabs_controls_not_flags(sdxl, tmp_path):
    from lib_ckpt2lora.ui import job
    from lib_ckpt2lora.ui.standalone_services import StandaloneServices

    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    tm.save(sdxl["base"], models / "base.safetensors")
    tm.save(sdxl["variant"], models / "variant.safetensors")
    services = StandaloneServices(models, loras)
    form = dict(base="base.safetensors", variant="variant.safetensors", name="x", min_dim=64, include="attn,k_proj")
    # A run with skips (min dim, include) and a te2 warning: report, summary, warnings.
    done = job.run_job(services, job.Form(**form, exclude="k_proj"))
    assert done.ok, done.message
    texts = [done.message, done.summary, *done.warnings, json.dumps(done.report)]
    assert "'Include only'" in done.summary
    # Refusals: an engine refusal and the "detail with a full checkpoint" one.
    for bad in (dict(rank=-1), dict(output_kind=job.OUTPUT_KINDS[2], detail=True)):
        refused = job.run_job(services, job.Form(**{**form, **bad}, overwrite=True))
        assert not refused.ok
        texts.append(refused.message)
    listed = job.list_job(services, job.Form(**form))
    assert listed.ok and "layers would be extracted" in listed.text
    texts.append(listed.text)
    for text in texts:  # a flag, not the summary table's ------ rules
        assert not re.search(r"--[a-z]", text), text


def test_every_flag_in_an_engine_message_has_a_tab_label():
    """A new flag named in a message must get a label, or the tab would show "--flag"."""
    from pathlib import Path

    from lib_ckpt2lora.ui.job import FLAG_LABELS

    package = Path(__file__).resolve().parent.parent / "lib_ckpt2lora"
    named = {}
    for source in package.rglob("*.py"):
        if source.name in ("cli.py", "demo.py", "__main__.py"):
            continue  # the command lines' own text (ours, the demo's, the standalone app's), never shown in the tab
        for text in _message_strings(source):
            for flag in re.findall(r"--[a-z][a-z0-9-]*", text):
                named.setdefault(flag, source.relative_to(package).as_posix())
    unlabelled = {flag: where for flag, where in named.items() if flag not in FLAG_LABELS}
    assert unlabelled == {}


def _message_strings(source):
    """The string literals of a module (f-string parts included), docstrings left out:
    comments and docstrings may name a script's flags, messages may not."""
    import ast

    tree = ast.parse(source.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value
