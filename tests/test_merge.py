"""Merging and resizing LoRAs (issue 20): the factor route's exactness against an
independent dense computation, the rank rules, precision, and every refusal.

Inputs are realistic: LoRAs cut from fine-tune-like full-rank noisy deltas (tests/realistic.py)
at widths >= 1024, their factors rounded to bf16 as real LoRAs are stored. The truth is
always computed here, densely, from the files' tensors: sum_i w_i * up_i @ down_i * alpha_i / r_i.
The real loaders applying merged files are in test_merge_loaders.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import realistic
import torch
from _feature_models import save_lora, torch_threads
from safetensors import safe_open
from safetensors.torch import load_file

from lib_ckpt2lora.cli import main
from lib_ckpt2lora.errors import UserError
from lib_ckpt2lora.toolbox.merge import Term, dense_route, factor_route, merge_terms
from lib_ckpt2lora.toolbox.merge_inputs import parse_merge_input

ROWS, COLS = 1024, 1536
MODULES = ("diffusion_model.blocks.0.attn", "diffusion_model.blocks.1.mlp")


@pytest.fixture(autouse=True, scope="module")
def _threads():
    with torch_threads(1):
        yield


@functools.cache
def _svd(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading 64 triplets of one fine-tune-like full-rank delta (cached: tests share seeds)."""
    u, s, vh = torch.linalg.svd(realistic.noisy_delta(ROWS, COLS, seed=seed), full_matrices=False)
    return u[:, :64], s[:64], vh[:64]


def lora_factors(seed: int, rank: int, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` LoRA of delta ``seed``, factors rounded to ``dtype``."""
    u, s, vh = _svd(seed)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(dtype), (root[:, None] * vh[:rank]).to(dtype)


def write_input(
    path: Path, seed: int, rank: int = 32, alpha: float | None = 16.0, dtype=torch.bfloat16, modules=MODULES, style="kohya"
) -> Path:
    tensors = {}
    for index, module in enumerate(modules):
        up, down = lora_factors(seed * 10 + index, rank, dtype)
        if alpha is not None:  # loaders scale by alpha / rank: store the factors so the product is the delta
            up = (up.float() * (rank / alpha)).to(dtype)
            tensors[module + ".alpha"] = torch.tensor(alpha)
        down_key, up_key = (".lora_down.weight", ".lora_up.weight") if style == "kohya" else (".lora_A.weight", ".lora_B.weight")
        tensors[module + down_key], tensors[module + up_key] = down, up
    return save_lora(tensors, path)


def applied(path: Path) -> dict[str, torch.Tensor]:
    """What a loader adds per module, computed densely from the file: scale * up @ down."""
    lora = load_file(str(path))
    out = {}
    for key in lora:
        for down_suffix, up_suffix in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
            if key.endswith(down_suffix):
                module = key[: -len(down_suffix)]
                down, up = lora[key].double().flatten(1), lora[module + up_suffix].double().flatten(1)
                scale = float(lora[module + ".alpha"]) / down.shape[0] if module + ".alpha" in lora else 1.0
                out[module] = scale * up @ down
    return out


def merge(tmp_path: Path, *args: str) -> tuple[int, Path]:
    out = tmp_path / "merged.safetensors"
    return main(["--merge", *args, "--out", str(out), "--overwrite"]), out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- the math -----------------------------------------------------------------------------------


def test_factor_route_is_the_exact_svd_of_the_weighted_sum():
    gen = torch.Generator().manual_seed(0)
    terms = [
        Term(weight, up=torch.randn(ROWS, rank, generator=gen), down=torch.randn(rank, COLS, generator=gen))
        for weight, rank in ((0.5, 16), (1.0, 32), (-0.7, 8))
    ]
    dense = sum(t.weight * t.up.double() @ t.down.double() for t in terms)
    spectrum = factor_route(terms, cap=56)
    up, down = spectrum.factors(56)
    assert relative(up @ down, dense) < 1e-4
    assert torch.allclose(spectrum.s.double(), torch.linalg.svdvals(dense)[:56], rtol=1e-4)
    assert spectrum.total_energy == pytest.approx(float(dense.square().sum()), rel=1e-6)


def test_dense_route_gives_the_same_result_as_the_factor_route():
    gen = torch.Generator().manual_seed(1)
    terms = [Term(w, up=torch.randn(ROWS, 8, generator=gen), down=torch.randn(8, COLS, generator=gen)) for w in (1.0, -0.3)]
    via_factors, via_dense = factor_route(terms, 16), dense_route(terms, 16)
    assert torch.allclose(via_factors.s[:16], via_dense.s[:16], rtol=1e-3)
    assert via_dense.total_energy == pytest.approx(via_factors.total_energy, rel=1e-4)


def test_a_dense_term_sends_the_module_to_the_dense_route():
    gen = torch.Generator().manual_seed(2)
    dense = torch.randn(64, 96, generator=gen)
    low = Term(0.5, up=torch.randn(64, 4, generator=gen), down=torch.randn(4, 96, generator=gen))
    spectrum = merge_terms([low, Term(2.0, dense=dense)], cap=64)
    assert spectrum.route == "dense"
    up, down = spectrum.factors(64)
    assert relative(up @ down, 0.5 * low.up @ low.down + 2.0 * dense) < 1e-4


# -- whole runs: exact, truncated, resize ---------------------------------------------------------


def test_merge_is_exact_when_the_rank_allows(tmp_path):
    inputs = [write_input(tmp_path / f"in{i}.safetensors", seed=i) for i in range(3)]
    weights = (0.5, 1.0, -0.7)
    rc, out = merge(tmp_path, f"{inputs[0]}:0.5", str(inputs[1]), f"{inputs[2]}:-0.7", "--rank", "96", "--save-dtype", "fp32")
    assert rc == 0
    truth = [applied(path) for path in inputs]
    got = applied(out)
    assert set(got) == set(MODULES)
    for module in MODULES:
        expected = sum(w * t[module] for w, t in zip(weights, truth))
        assert relative(got[module], expected) < 1e-3, module


def test_truncated_merge_keeps_the_optimal_energy(tmp_path):
    inputs = [write_input(tmp_path / f"in{i}.safetensors", seed=i) for i in range(3)]
    rc, out = merge(tmp_path, *map(str, inputs), "--rank", "24")
    assert rc == 0
    truth = [applied(path) for path in inputs]
    got = applied(out)
    for module in MODULES:
        total = sum(t[module] for t in truth)
        optimal = float(torch.linalg.svdvals(total)[:24].square().sum())
        kept = float(total.square().sum() - (total - got[module]).square().sum())
        assert kept >= 0.999 * optimal, (module, kept / optimal)


def test_resize_is_the_best_lora_of_the_smaller_rank(tmp_path):
    source = write_input(tmp_path / "big.safetensors", seed=0, rank=64)
    rc, out = merge(tmp_path, str(source), "--rank", "8", "--save-dtype", "fp32")
    assert rc == 0
    for module, product in applied(source).items():
        u, s, vh = torch.linalg.svd(product, full_matrices=False)
        best = (u[:, :8] * s[:8]) @ vh[:8]
        assert relative(applied(out)[module], best) < 1e-3
        assert load_file(str(out))[module + ".lora_down.weight"].shape[0] == 8


def test_energy_rule_and_rank_cap(tmp_path):
    inputs = [write_input(tmp_path / f"in{i}.safetensors", seed=i) for i in range(2)]
    rc, out = merge(tmp_path, *map(str, inputs), "--rank", "0", "--rank-thresh", "0.8", "--rank-max", "40")
    assert rc == 0
    truth = [applied(path) for path in inputs]
    lora = load_file(str(out))
    for module in MODULES:
        total = sum(t[module] for t in truth)
        energies = torch.cumsum(torch.linalg.svdvals(total).square(), 0) / total.square().sum()
        wanted = min(int((energies < 0.8 - 1e-12).sum()) + 1, 40)
        assert lora[module + ".lora_down.weight"].shape[0] == wanted


def test_modules_in_only_some_inputs_take_just_those(tmp_path):
    a = write_input(tmp_path / "a.safetensors", seed=0, modules=MODULES[:1])
    b = write_input(tmp_path / "b.safetensors", seed=1, modules=MODULES, style="peft", alpha=None)
    rc, out = merge(tmp_path, f"{a}:2", f"{b}:0.5", "--rank", "64", "--save-dtype", "fp32")
    assert rc == 0
    ta, tb, got = applied(a), applied(b), applied(out)
    assert relative(got[MODULES[0]], 2 * ta[MODULES[0]] + 0.5 * tb[MODULES[0]]) < 1e-3
    assert relative(got[MODULES[1]], 0.5 * tb[MODULES[1]]) < 1e-3


def test_loha_module_is_merged_densely(tmp_path):
    gen = torch.Generator().manual_seed(5)
    loha = {
        MODULES[0] + ".hada_w1_a": torch.randn(ROWS, 4, generator=gen) * 0.1,
        MODULES[0] + ".hada_w1_b": torch.randn(4, COLS, generator=gen) * 0.1,
        MODULES[0] + ".hada_w2_a": torch.randn(ROWS, 4, generator=gen) * 0.1,
        MODULES[0] + ".hada_w2_b": torch.randn(4, COLS, generator=gen) * 0.1,
        MODULES[0] + ".alpha": torch.tensor(2.0),
    }
    loha_path = save_lora(loha, tmp_path / "loha.safetensors")
    lora_path = write_input(tmp_path / "lora.safetensors", seed=2, modules=MODULES[:1], dtype=torch.float32)
    rc, out = merge(tmp_path, str(loha_path), f"{lora_path}:-1", "--rank", "64", "--rank-max", "64")
    assert rc == 0
    w = loha
    hadamard = (w[MODULES[0] + ".hada_w1_a"] @ w[MODULES[0] + ".hada_w1_b"]) * (
        w[MODULES[0] + ".hada_w2_a"] @ w[MODULES[0] + ".hada_w2_b"]
    )
    total = 2.0 / 4 * hadamard.double() - applied(lora_path)[MODULES[0]]
    optimal = float(torch.linalg.svdvals(total)[:64].square().sum())
    got = applied(out)[MODULES[0]]
    kept = float(total.square().sum() - (total - got).square().sum())
    assert kept >= 0.999 * optimal


# -- precision, size, names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored, flag, written",
    [(torch.float32, None, torch.float32), (torch.bfloat16, None, torch.bfloat16), (torch.float32, "fp16", torch.float16)],
)
def test_precision_is_the_inputs_unless_save_dtype(tmp_path, stored, flag, written):
    inputs = [write_input(tmp_path / f"in{i}.safetensors", seed=i, rank=8, dtype=stored) for i in range(2)]
    rc, out = merge(tmp_path, *map(str, inputs), "--rank", "8", *(["--save-dtype", flag] if flag else []))
    assert rc == 0
    assert {t.dtype for t in load_file(str(out)).values()} == {written}


def test_target_size_is_met_and_not_exceeded(tmp_path):
    inputs = [write_input(tmp_path / f"in{i}.safetensors", seed=i) for i in range(2)]
    target = 400_000  # every module at rank 64 would take 655 KB
    rc, out = merge(tmp_path, *map(str, inputs), "--rank", "0", "--target-size", "400KB")
    assert rc == 0
    size = out.stat().st_size
    triplet = (ROWS + COLS) * 2  # one more rank in bf16
    assert target - 2 * triplet < size <= target
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert meta["ckpt2lora_kind"] == "merge" and "in0.safetensors" in meta["ckpt2lora_inputs"]


# -- the FILE:WEIGHT syntax, refusals ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, path, weight",
    [
        ("a.safetensors", "a.safetensors", 1.0),
        ("a.safetensors:0.5", "a.safetensors", 0.5),
        ("dir/a.safetensors:-0.7", "dir/a.safetensors", -0.7),
        ("a.safetensors:1e-1", "a.safetensors", 0.1),
        ("C:\\loras\\a.safetensors:0.5", "C:\\loras\\a.safetensors", 0.5),
        ("C:\\loras\\a.safetensors", "C:\\loras\\a.safetensors", 1.0),
        ("D:/loras/b.safetensors:2", "D:/loras/b.safetensors", 2.0),
    ],
)
def test_file_and_weight_parse_windows_paths_too(text, path, weight):
    parsed = parse_merge_input(text)
    assert str(parsed.path) == str(Path(path)) and parsed.weight == weight


@pytest.mark.parametrize("text", ["a.safetensors:abc", "a.safetensors:", "a.safetensors:nan", "C:\\a.safetensors:0,5"])
def test_bad_weight_is_one_sentence(text):
    with pytest.raises(UserError, match="must be"):
        parse_merge_input(text)


def _refused(tmp_path, capsys, args, *words):
    out = tmp_path / "merged.safetensors"
    rc = main(["--merge", *args, "--out", str(out)])
    *announced, err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    # the one sentence, after at most the run's opening line (refusals from the headers come before it)
    assert err.startswith("ckpt2lora: ") and "Traceback" not in err
    assert len(announced) <= 1 and all(line.startswith(("Merge of", "Resize of")) for line in announced), announced
    for word in words:
        assert word in err, err
    return out


def test_a_lora_of_another_family_is_refused(tmp_path, capsys):
    a = write_input(tmp_path / "a.safetensors", seed=0, rank=4)
    sd = save_lora(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2),
        },
        tmp_path / "sd.safetensors",
        metadata={"ss_base_model_version": "sd_v1"},
    )
    out = _refused(tmp_path, capsys, [str(a), str(sd)], "sd.safetensors", "SD1.5", "one model family")
    assert not out.exists()


def test_damaged_file_is_refused(tmp_path, capsys):
    good = write_input(tmp_path / "good.safetensors", seed=0, rank=4)
    data = good.read_bytes()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(data[: len(data) // 2])
    out = _refused(tmp_path, capsys, [str(good), str(damaged)], "damaged.safetensors")
    assert not out.exists()


def test_nan_in_a_lora_is_refused(tmp_path, capsys):
    good = write_input(tmp_path / "good.safetensors", seed=0, rank=4)
    lora = load_file(str(good))
    lora[MODULES[0] + ".lora_up.weight"][0, 0] = float("nan")
    bad = save_lora(lora, tmp_path / "nan.safetensors")
    out = _refused(tmp_path, capsys, [str(good), str(bad)], "NaN", "nan.safetensors")
    assert not out.exists()


def test_bad_weight_on_the_command_line(tmp_path, capsys):
    good = write_input(tmp_path / "good.safetensors", seed=0, rank=4)
    _refused(tmp_path, capsys, [f"{good}:half"], "half", "FILE:WEIGHT")


def test_existing_output_is_kept(tmp_path, capsys):
    good = write_input(tmp_path / "good.safetensors", seed=0, rank=4)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"keep me")
    _refused(tmp_path, capsys, [str(good)], "already exists", "--overwrite")
    assert out.read_bytes() == b"keep me"


def test_shape_mismatch_and_dora_and_checkpoint_are_refused(tmp_path, capsys):
    a = write_input(tmp_path / "a.safetensors", seed=0, rank=4)
    module = MODULES[0]
    narrow = save_lora(
        {module + ".lora_down.weight": torch.zeros(2, 64), module + ".lora_up.weight": torch.zeros(ROWS, 2)},
        tmp_path / "narrow.safetensors",
    )
    _refused(tmp_path, capsys, [str(a), str(narrow)], "narrow.safetensors", "different models")
    dora = save_lora(
        {
            module + ".lora_down.weight": torch.zeros(2, COLS),
            module + ".lora_up.weight": torch.zeros(ROWS, 2),
            module + ".dora_scale": torch.ones(1, COLS),
        },
        tmp_path / "dora.safetensors",
    )
    _refused(tmp_path, capsys, [str(dora)], "DoRA")
    model = save_lora({"blocks.0.attn.weight": torch.zeros(8, 8)}, tmp_path / "model.safetensors")
    _refused(tmp_path, capsys, [str(model)], "model.safetensors", "not a LoRA")


def test_merge_needs_no_base_but_extraction_still_does(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--variant", "v.safetensors", "--out", str(tmp_path / "o.safetensors")])
    assert raised.value.code == 2
    assert "--base and --variant" in capsys.readouterr().err
    good = write_input(tmp_path / "good.safetensors", seed=0, rank=4)
    with pytest.raises(SystemExit):
        main(["--merge", str(good), "--base", "b.safetensors", "--out", str(tmp_path / "o.safetensors")])
    assert "drop --base" in capsys.readouterr().err


def test_flux_layouts_keep_theirs_and_do_not_mix(tmp_path, capsys):
    gen = torch.Generator().manual_seed(9)

    def lora(names, path, style):
        down_key, up_key = (".lora_down.weight", ".lora_up.weight") if style == "kohya" else (".lora_A.weight", ".lora_B.weight")
        tensors = {}
        for name in names:
            tensors[name + down_key] = torch.randn(2, 64, generator=gen)
            tensors[name + up_key] = torch.randn(64, 2, generator=gen)
        return save_lora(tensors, tmp_path / path)

    diffusers_names = ["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_out"]
    a = lora(diffusers_names, "a.safetensors", "peft")
    b = lora(diffusers_names, "b.safetensors", "peft")
    rc, out = merge(tmp_path, str(a), str(b), "--rank", "4")
    assert rc == 0
    assert {k.rsplit(".", 2)[0] for k in load_file(str(out))} == set(diffusers_names)  # diffusers format, not kohya
    bfl = lora(["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear2"], "bfl.safetensors", "kohya")
    out.unlink()
    _refused(tmp_path, capsys, [str(bfl), str(a)], "BFL layout", "diffusers layout")


def test_sdxl_te2_attention_groups_are_completed_for_a1111(tmp_path):
    """A1111 applies a te2 attention layer's LoRA only when q, k, v and out all exist."""
    gen = torch.Generator().manual_seed(11)
    head = "lora_te2_text_model_encoder_layers_0_self_attn_"
    tensors = {}
    for member in ("q", "k"):
        tensors[f"{head}{member}_proj.lora_down.weight"] = torch.randn(2, 64, generator=gen)
        tensors[f"{head}{member}_proj.lora_up.weight"] = torch.randn(64, 2, generator=gen)
        tensors[f"{head}{member}_proj.alpha"] = torch.tensor(2.0)
    source = save_lora(tensors, tmp_path / "te2.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    rc, out = merge(tmp_path, str(source), "--rank", "2")
    assert rc == 0
    lora = load_file(str(out))
    for member in ("v", "out"):
        assert not lora[f"{head}{member}_proj.lora_up.weight"].any()
    assert relative(applied(out)[head + "q_proj"], applied(source)[head + "q_proj"]) < 1e-3


@pytest.mark.parametrize(
    "shapes, metadata, family",
    [
        (
            {"lora_unet_double_blocks_0_img_attn_proj": (3072, 3072), "lora_unet_double_blocks_0_img_mlp_0": (12288, 3072)},
            {},
            "flux",
        ),
        (
            {"lora_unet_double_blocks_0_img_attn_proj": (3072, 3072), "lora_unet_double_blocks_0_img_mlp_0": (18432, 3072)},
            {},
            "flux2",
        ),
        ({"lora_unet_double_blocks_0_img_attn_proj": (4096, 4096)}, {}, "flux2"),
        ({"lora_unet_double_stream_modulation_img_lin": (18432, 3072)}, {}, "generic"),  # no block: not told
        ({"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj": (27648, 3072)}, {}, "flux2"),
        ({"lora_unet_double_blocks_0_img_attn_proj": (3072, 3072)}, {"modelspec.architecture": "Flux.2-klein-4b/lora"}, "flux2"),
        ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768)}, {}, "sd15"),
        ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 2048)}, {}, "sdxl"),
        ({"diffusion_model.layers.0.attention.to_q": (3840, 3840)}, {}, "zimage"),
        ({"diffusion_model.layers.0.attention.to_q": (2304, 2304)}, {}, "lumina2"),
        ({"transformer.transformer_blocks.0.img_mlp.net.0.proj": (12288, 3072)}, {}, "qwen_image"),
        ({"diffusion_model.blocks.0.self_attn.q": (5120, 5120)}, {}, "wan"),
        ({"lora_unet_blocks_0_cross_attn_k": (5120, 4096)}, {"ss_base_model_version": "wan"}, "wan"),
    ],
)
def test_family_from_names_shapes_or_header(tmp_path, shapes, metadata, family):
    from lib_ckpt2lora.lora_input import parse_modules
    from lib_ckpt2lora.reading import TensorFile
    from lib_ckpt2lora.toolbox.merge_inputs import lora_family

    tensors = {}
    for name, (rows, cols) in shapes.items():
        tensors[name + ".lora_down.weight"] = torch.zeros(1, cols, dtype=torch.bfloat16)
        tensors[name + ".lora_up.weight"] = torch.zeros(rows, 1, dtype=torch.bfloat16)
    path = save_lora(tensors, tmp_path / "lora.safetensors", metadata=metadata or None)
    with TensorFile(path, "LoRA") as file:
        assert lora_family(file, parse_modules(file)) == family
