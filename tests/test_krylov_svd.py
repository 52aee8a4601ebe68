"""The block Krylov randomized SVD (svd.randomized_svd) on realistic bf16 layers.

Wide and tall layers up to 10240 (the Z-Image MLP's width), flat and noisy spectra: the
energy kept at the automatic rank is >= 0.999 of the optimum, the rank is the exact
rule's except on a near-tie, the Ritz values are lower bounds of the true ones and the
reported energy is the factors' own. Both product precisions are checked: fp32, and
bf16 (taken only where the CPU multiplies bf16 faster; elsewhere that case runs fp32).
"""

from __future__ import annotations

import pytest
import realistic as rl
import torch

from lib_ckpt2lora import svd
from lib_ckpt2lora.rank import rank_for_energy

NEAR_TIE = 1e-4
LAYERS = [  # rows, cols, seed, decay, noise
    (1024, 10240, 40, 0.5, 0.5),  # flat under heavy noise: the rank hits the cap
    (10240, 1024, 41, 1.0, 0.3),  # a typical fine-tune, tall
]


def bf16_layer(rows, cols, seed, decay, noise):
    """bf16(base + delta) - bf16(base): the delta the engine sees for a bf16 pair."""
    base = (rl.WEIGHT_STD * torch.randn(rows, cols, generator=rl.generator(seed))).to(torch.bfloat16)
    delta = rl.noisy_delta(rows, cols, seed=seed + 1, decay=decay, noise=noise)
    return (base.float() + delta).to(torch.bfloat16).float() - base.float()


@pytest.fixture(scope="module", params=LAYERS, ids=[f"{r}x{c}" for r, c, *_ in LAYERS])
def layer(request):
    delta = bf16_layer(*request.param)
    exact = torch.linalg.svdvals(delta.double())
    return delta, exact


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threshold", [0.8, 0.95])
def test_energy_and_rank_against_the_exact_svd(layer, monkeypatch, bf16, threshold):
    delta, exact = layer
    monkeypatch.setattr(svd, "BF16_ON_CPU", bf16)
    fact = svd.factorize(delta, threshold=threshold, cap=64, generator=torch.Generator().manual_seed(1))
    cumulative = torch.cumsum(exact**2, 0) / float((exact**2).sum())
    expected = min(int(torch.nonzero(cumulative >= threshold)[0]) + 1, 64)
    if fact.rank != expected:
        tie = min(abs(float(cumulative[r - 1]) - threshold) for r in (fact.rank, expected))
        assert abs(fact.rank - expected) == 1 and tie <= NEAR_TIE, (fact.rank, expected, tie)
    optimum = float(cumulative[fact.rank - 1])
    assert fact.energy >= 0.999 * optimum, (fact.energy, optimum)
    captured = 1 - float((delta.double() - (fact.up @ fact.down).double()).norm() ** 2 / (exact**2).sum())
    assert fact.energy == pytest.approx(captured, abs=1e-5)  # the report tells the truth
    # Ritz values never exceed the true ones (fp32 rounding aside): the rank cannot fall short.
    found = fact.singular_values.double()
    assert torch.all(found <= exact[: len(found)] * (1 + 1e-5))


def test_space_stops_at_the_rank_bound():
    """A block as wide as a third of the smaller side: the space stops growing before it
    would exceed that side, and the result is still the exact top of the spectrum."""
    delta = bf16_layer(600, 240, seed=7, decay=0.5, noise=0.5)
    u, s, vh = svd.randomized_svd(delta, 80, keep=64, generator=torch.Generator().manual_seed(0), tolerance=0.0)
    exact = torch.linalg.svdvals(delta.double())
    assert len(s) == 80
    assert torch.allclose(s.double(), exact[:80], rtol=1e-3)
    assert torch.allclose(u.T @ u, torch.eye(80), atol=1e-4)


def test_rank_rule_on_the_krylov_values_is_the_exact_rule_for_a_steep_spectrum(monkeypatch):
    delta = bf16_layer(1024, 1536, seed=9, decay=1.5, noise=0.1)
    exact = torch.linalg.svdvals(delta.double())
    _, s, _ = svd.randomized_svd(delta, 80, keep=64, generator=torch.Generator().manual_seed(2))
    total = float((exact**2).sum())
    for threshold in (0.5, 0.8, 0.95):
        assert rank_for_energy(s, total, threshold, 64) == rank_for_energy(exact, total, threshold, 64)
