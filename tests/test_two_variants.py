"""Two variants (``--variant2``): the common part and the weighted union (SPEC section 6).

Required: common(D, D) = D; common(D, -D) = 0; D1, D2 with orthogonal row and column
spaces -> 0; symmetric in D1, D2; union = w1 D1 + w2 D2 - C with w1 = 2 alpha,
w2 = 2 (1 - alpha), so union(D, D) = D for any alpha and orthogonal deltas at alpha 0.5
give D1 + D2. Checked end to end on tiny real models (Z-Image, SD1.5) through the
written LoRA, and on random matrices through ``lib_ckpt2lora.combine`` directly.

Deltas are built from mutually orthogonal pieces with flat spectra (every direction
holds the same energy), so any energy rule keeps all of them and the expected results
are exact: with S, A1, A2 in mutually orthogonal row and column spaces,
common(S + A1, S + A2) = S and union = S + w1 A1 + w2 A2.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from _feature_models import run_extract, torch_threads

from lib_ckpt2lora.combine import combine, common_part
from lib_ckpt2lora.errors import UserError

PIECE_RANK = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def orthogonal_pieces(shape, count: int, generator, size: float) -> list[torch.Tensor]:
    """``count`` rank-3 matrices of Frobenius norm ``size`` whose row spaces are mutually
    orthogonal and whose column spaces are too, each with a flat spectrum."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    width = PIECE_RANK * count
    u = torch.linalg.qr(torch.randn(rows, width, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, width, generator=generator, dtype=torch.float64))[0]
    pieces = []
    for i in range(count):
        part = slice(i * PIECE_RANK, (i + 1) * PIECE_RANK)
        piece = u[:, part] @ v[:, part].T * (size / PIECE_RANK**0.5)
        pieces.append(piece.reshape(shape).float())
    return pieces


def make_pieces(state: dict[str, torch.Tensor], seed: int, count: int = 3, min_side: int = 32) -> dict[str, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    pieces = {}
    for key in sorted(state):
        weight = state[key]
        if weight.dim() < 2 or min(weight.shape[0], weight[0].numel()) < min_side:
            continue
        pieces[key] = orthogonal_pieces(tuple(weight.shape), count, generator, 0.02 * float(weight.norm()))
    return pieces


def with_delta(state, pieces, weights) -> dict[str, torch.Tensor]:
    """state + sum(w_i * piece_i) on every key that has pieces."""
    out = dict(state)
    for key, parts in pieces.items():
        out[key] = state[key] + sum(w * p for w, p in zip(weights, parts))
    return out


def dense(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> the delta a loader applies (up @ down, times alpha / rank if any)."""
    result = {}
    for key, down in lora.items():
        for down_suffix, up_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight")):
            if key.endswith(down_suffix):
                module = key[: -len(down_suffix)]
                up = lora[module + up_suffix]
                scale = float(lora[module + ".alpha"]) / down.shape[0] if module + ".alpha" in lora else 1.0
                result[module] = scale * (up.flatten(1) @ down.flatten(1))
    return result


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def assert_dense_close(got: dict, expected: dict, tolerance: float = 1e-3) -> None:
    assert sorted(got) == sorted(expected), set(got) ^ set(expected)
    bad = {k: relative(got[k], expected[k]) for k in expected if relative(got[k], expected[k]) > tolerance}
    assert not bad, f"{len(bad)} of {len(expected)} modules off: {dict(list(bad.items())[:5])}"


def assert_no_common_part(call, reference_norms: dict[str, float]) -> None:
    """Either the engine's "No difference" refusal, or a LoRA whose deltas are ~0."""
    try:
        _, out = call()
    except UserError as error:
        assert "Nothing in common" in str(error)
        return
    for module, delta in dense(out).items():
        assert float(delta.norm()) <= 1e-4 * reference_norms[module], module


# -- Z-Image end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_variants")
    state = {k: v.detach().clone() for k, v in tm.zimage_transformer(0).state_dict().items()}
    pieces = make_pieces(state, seed=31)
    files = {}

    def variant(name, weights):
        if name not in files:
            files[name] = tm.save(tm.zimage_checkpoint(with_delta(state, pieces, weights)), folder / f"{name}.safetensors")
        return files[name]

    base = tm.save(tm.zimage_checkpoint(state), folder / "base.safetensors")
    return SimpleNamespace(folder=folder, state=state, pieces=pieces, base=base, variant=variant)


def expected_modules(zimage, weights) -> dict[str, torch.Tensor]:
    """diffusion_model.<key> -> sum(w_i * piece_i) flattened, for the keys with pieces."""
    out = {}
    for key, parts in zimage.pieces.items():
        total = sum(w * p for w, p in zip(weights, parts))
        out["diffusion_model." + key[: -len(".weight")]] = total.reshape(total.shape[0], -1)
    return out


OPTIONS = dict(rank=12, min_dim=32)


def test_common_of_a_delta_with_itself_is_that_delta(zimage):
    d = zimage.variant("d", (1, 1, 0))
    _, single = run_extract(zimage.folder, zimage.base, d, "single_d", **OPTIONS)
    _, common = run_extract(zimage.folder, zimage.base, d, "common_dd", variant2=d, **OPTIONS)
    assert_dense_close(dense(common), dense(single))
    assert_dense_close(dense(common), expected_modules(zimage, (1, 1, 0)))


def test_common_of_opposite_deltas_is_zero(zimage):
    plus, minus = zimage.variant("d", (1, 1, 0)), zimage.variant("minus_d", (-1, -1, 0))
    norms = {m: float(t.norm()) for m, t in expected_modules(zimage, (1, 1, 0)).items()}
    assert_no_common_part(
        lambda: run_extract(zimage.folder, zimage.base, plus, "common_opposite", variant2=minus, **OPTIONS), norms
    )


def test_common_of_orthogonal_deltas_is_zero(zimage):
    d1, d2 = zimage.variant("only_1", (1, 0, 0)), zimage.variant("only_2", (0, 1, 0))
    norms = {m: float(t.norm()) for m, t in expected_modules(zimage, (1, 0, 0)).items()}
    assert_no_common_part(lambda: run_extract(zimage.folder, zimage.base, d1, "common_orthogonal", variant2=d2, **OPTIONS), norms)


def test_common_is_symmetric_and_is_the_shared_part(zimage):
    d1, d2 = zimage.variant("s_a1", (1, 1, 0)), zimage.variant("s_a2", (1, 0, 1))
    _, one_two = run_extract(zimage.folder, zimage.base, d1, "common_12", variant2=d2, **OPTIONS)
    _, two_one = run_extract(zimage.folder, zimage.base, d2, "common_21", variant2=d1, **OPTIONS)
    # 1e-5, not bit-equal: -A's SVD picks another basis of a degenerate cluster (equal-norm
    # pieces); measured 1.5e-6. It was 7e-5 while the noise floor read A's fp32 rounding.
    assert_dense_close(dense(one_two), dense(two_one), tolerance=1e-5)
    assert_dense_close(dense(one_two), expected_modules(zimage, (1, 0, 0)))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_union_of_a_delta_with_itself_is_that_delta(zimage, alpha):
    d = zimage.variant("d", (1, 1, 0))
    _, union = run_extract(zimage.folder, zimage.base, d, f"union_dd_{alpha}", variant2=d, union=True, alpha=alpha, **OPTIONS)
    assert_dense_close(dense(union), expected_modules(zimage, (1, 1, 0)))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_union_weights_each_own_part_and_counts_the_shared_part_once(zimage, alpha):
    """union(S + A1, S + A2) = w1 D1 + w2 D2 - C = S + w1 A1 + w2 A2."""
    d1, d2 = zimage.variant("s_a1", (1, 1, 0)), zimage.variant("s_a2", (1, 0, 1))
    w1, w2 = 2 * alpha, 2 * (1 - alpha)
    _, union = run_extract(zimage.folder, zimage.base, d1, f"union_{alpha}", variant2=d2, union=True, alpha=alpha, **OPTIONS)
    assert_dense_close(dense(union), expected_modules(zimage, (1, w1, w2)))
    # ... which is w1 D1 + w2 D2 - C with C the engine's own common part of the pair
    _, common = run_extract(zimage.folder, zimage.base, d1, "common_12", variant2=d2, **OPTIONS)
    d1_dense, d2_dense = expected_modules(zimage, (1, 1, 0)), expected_modules(zimage, (1, 0, 1))
    formula = {m: w1 * d1_dense[m] + w2 * d2_dense[m] - c for m, c in dense(common).items()}
    assert_dense_close(dense(union), formula)


def test_union_of_orthogonal_deltas_at_half_is_their_sum(zimage):
    d1, d2 = zimage.variant("only_1", (1, 0, 0)), zimage.variant("only_2", (0, 1, 0))
    _, union = run_extract(zimage.folder, zimage.base, d1, "union_orthogonal", variant2=d2, union=True, alpha=0.5, **OPTIONS)
    assert_dense_close(dense(union), expected_modules(zimage, (1, 1, 0)))


# -- SD1.5 (convolutions, kohya names) -------------------------------------------------------------


def test_sd15_common_and_union_with_convolutions(tmp_path):
    model = tm.sd15_model(0)
    states = model.states()
    pieces = make_pieces(states["unet"], seed=32)
    base = tm.save(tm.sd15_checkpoint(model, states), tmp_path / "base.safetensors")

    def variant(name, weights):
        changed = dict(states, unet=with_delta(states["unet"], pieces, weights))
        return tm.save(tm.sd15_checkpoint(model, changed), tmp_path / f"{name}.safetensors")

    d1, d2 = variant("s_a1", (1, 1, 0)), variant("s_a2", (1, 0, 1))
    # resnets (3x3 convs, 1x1 skip), attention, a downsampler and the middle block
    options = dict(rank=12, min_dim=32, include="input_blocks.4.,input_blocks.6.,middle_block.")
    _, common = run_extract(tmp_path, base, d1, "common", variant2=d2, **options)
    _, union = run_extract(tmp_path, base, d1, "union", variant2=d2, union=True, alpha=0.5, **options)
    shared, summed = dense(common), dense(union)
    assert any(v.dim() == 4 and v.shape[-1] == 3 for v in common.values()), "no 3x3 conv in the test"
    names = tm.unet_to_ldm(states["unet"], model.components["unet"].config)
    checked = 0
    for key, parts in pieces.items():
        if not names[key].startswith(("input_blocks.4.", "input_blocks.6.", "middle_block.")):
            continue
        module = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        assert module in shared, (module, names[key])
        assert relative(shared[module], parts[0].reshape(parts[0].shape[0], -1)) < 1e-3, module
        expected = (parts[0] + parts[1] + parts[2]).reshape(parts[0].shape[0], -1)
        assert relative(summed[module], expected) < 1e-3, module
        checked += 1
    assert checked > 20


# -- unit level: lib_ckpt2lora.combine ---------------------------------------------------------------


def options(**changes):
    values = dict(rank=0, rank_max=64, rank_thresh=0.95, svd="randomized", union=False, alpha=0.5)
    values.update(changes)
    return SimpleNamespace(**values)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(33)


@pytest.mark.parametrize("shape", [(256, 192), (64, 640), (48, 32, 3, 3)])
def test_unit_common_part_properties(generator, shape):
    s, a1, a2 = orthogonal_pieces(shape, 3, generator, 1.0)
    gen = torch.Generator().manual_seed(0)
    assert relative(common_part(s, s, 64, generator=gen), s) < 1e-4
    assert float(common_part(s, -s, 64, generator=gen).norm()) < 1e-4
    assert float(common_part(a1, a2, 64, generator=gen).norm()) < 1e-4
    both = common_part(s + a1, s + a2, 64, exact=True)
    assert relative(both, s) < 1e-4
    assert torch.allclose(both, common_part(s + a2, s + a1, 64, exact=True), atol=1e-6)
    assert common_part(torch.zeros(shape), s, 64).abs().max() == 0


def test_unit_common_part_with_only_column_spaces_orthogonal_is_zero(generator):
    """The module docstring promises 0 when the row OR the column spaces are orthogonal."""
    u = torch.linalg.qr(torch.randn(200, 6, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(150, 3, generator=generator))[0]
    d1 = u[:, :3] @ v.T
    d2 = u[:, 3:] @ v.T  # same row space, orthogonal column space
    assert float(common_part(d1, d2, 64, exact=True).norm()) < 1e-5


def test_unit_common_part_symmetric_on_general_deltas(generator):
    d1 = torch.randn(128, 96, generator=generator) @ torch.diag(torch.linspace(1, 0.01, 96))
    d2 = d1 + 0.5 * torch.randn(128, 96, generator=generator)
    one = common_part(d1, d2, 200, exact=True)
    two = common_part(d2, d1, 200, exact=True)
    assert relative(one, two) < 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_unit_union_formula(generator, alpha):
    d1 = torch.randn(96, 80, generator=generator)
    d2 = 0.5 * d1 + torch.randn(96, 80, generator=generator)
    opts = options(union=True, alpha=alpha, svd="exact")
    c = combine(d1, d2, options(svd="exact"))
    expected = 2 * alpha * d1 + 2 * (1 - alpha) * d2 - c
    assert relative(combine(d1, d2, opts), expected) < 1e-5
    # union(D, D) = D
    s = orthogonal_pieces((96, 80), 1, generator, 1.0)[0]
    assert relative(combine(s, s, opts), s) < 1e-4


def test_unit_union_of_orthogonal_deltas(generator):
    a1, a2 = orthogonal_pieces((120, 90), 2, generator, 1.0)
    for alpha in (0.5, 0.75):
        got = combine(a1, a2, options(union=True, alpha=alpha))
        assert relative(got, 2 * alpha * a1 + 2 * (1 - alpha) * a2) < 1e-4


def test_unit_common_part_of_1d_deltas():
    d = torch.linspace(-1, 1, 50)
    assert relative(common_part(d, d, 4), d) < 1e-5
    assert float(common_part(d, -d, 4).norm()) < 1e-5
