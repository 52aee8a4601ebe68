"""The default randomized SVD, end to end as users run it (issue 10 section 2).

bf16 pairs 1024-1536 wide with full-rank noise (tests/realistic.py) go through
``extract``; each written layer is checked against an exact float64 SVD of the same fp32
delta:
- the rank equals the exact rule's, except on a near-tie: the exact cumulative energy at
  r - 1 (or at r) within NEAR_TIE of the threshold, where rounding decides;
- the energy the written factors capture is at least 0.995 of the optimum at that rank.
"""

from __future__ import annotations

import pytest
import realistic as rl
import torch
from _feature_models import silent_log
from safetensors.torch import load_file
from test_two_variants import dense

from lib_ckpt2lora.extract import extract
from lib_ckpt2lora.options import ExtractOptions
from lib_ckpt2lora.svd import EXACT_FRACTION, OVERSAMPLE

NEAR_TIE = 1e-4
REPORTED_ENERGY = 3e-4
SPECTRA = {
    "noisy": dict(decay=1.0, noise=0.3),  # a typical fine-tune
    "steep": dict(decay=1.5, noise=0.1),  # threshold met well below the cap
    "flat": dict(decay=0.5, noise=0.5),  # slow decay, heavy noise: the rank hits the cap
}
# One spectrum per threshold keeps the run short; flat at the cap is the hard case (two
# fixed power iterations kept 0.987 of the optimum there).
CASES = [("steep", 0.5), ("noisy", 0.8), ("flat", 0.95)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-{t}" for s, t in CASES])
def case(request, tmp_path_factory):
    spectrum, threshold = request.param
    folder = tmp_path_factory.mktemp("randomized_" + spectrum)
    base = rl.base_weights(seed=0)  # square, tall and wide layers
    deltas = {key: rl.noisy_delta(*w.shape, seed=20 + i, **SPECTRA[spectrum]) for i, (key, w) in enumerate(base.items())}
    variant = rl.apply_delta(base, deltas)
    files = (rl.save(base, folder / "base.safetensors"), rl.save(variant, folder / "variant.safetensors"))
    exact = {key: torch.linalg.svdvals(d.double()) for key, d in rl.realized(base, variant).items()}
    return folder, files, rl.realized(base, variant), exact, threshold


def exact_rank(values: torch.Tensor, threshold: float, cap: int) -> tuple[int, torch.Tensor]:
    cumulative = torch.cumsum(values**2, 0) / float((values**2).sum())
    reached = torch.nonzero(cumulative >= threshold)
    return min(int(reached[0]) + 1 if len(reached) else len(values), cap), cumulative


def test_rank_and_energy_match_the_exact_svd(case):
    folder, (base, variant), deltas, exact, threshold = case
    cap = 64
    out = folder / f"lora_{threshold}.safetensors"
    result = extract(
        ExtractOptions(
            base=base, variant=variant, out=out, rank_thresh=threshold, rank_max=cap, save_dtype="fp32", overwrite=True
        ),
        log=silent_log,
    )
    written = dense(load_file(str(out)))
    assert len(result.report.layers) == len(deltas)
    for layer in result.report.layers:
        delta = deltas[layer.key]
        assert cap + OVERSAMPLE < EXACT_FRACTION * min(delta.shape), "this layer would take the exact path"
        expected, cumulative = exact_rank(exact[layer.key], threshold, cap)
        if layer.rank != expected:
            tie = min(abs(float(cumulative[r - 1]) - threshold) for r in (layer.rank, expected) if r > 0)
            assert abs(layer.rank - expected) == 1 and tie <= NEAR_TIE, (layer.key, layer.rank, expected, tie)
        product = written["diffusion_model." + layer.key[: -len(".weight")]].double()
        captured = 1 - float((delta.double() - product).norm() ** 2 / delta.double().norm() ** 2)
        optimum = float(cumulative[layer.rank - 1])
        assert captured >= 0.995 * optimum, (layer.key, captured, optimum)
        # The report tells the truth, to the bf16 products' rounding of the values (up to
        # 1.5e-4 of the energy measured on these layers; svd._ritz_triplets).
        assert layer.energy == pytest.approx(captured, abs=REPORTED_ENERGY)
