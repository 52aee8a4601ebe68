"""benchmarks/bench_budget.py's two halves agree: the figures measured from a written LoRA
(budget_measure) and the ones worked out from its report's spectra (budget_curve), on a
realistic bf16 pair wide enough for the randomized SVD path; and the per-layer curve's
interpolation on a spectrum worked out by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import realistic as rl

from benchmarks import budget_curve, budget_measure

SHAPES = {"blocks.0.attn.weight": (1024, 1024), "blocks.0.mlp.weight": (1536, 1024), "blocks.1.proj.weight": (1024, 1280)}


def test_per_layer_rule_is_interpolated_between_the_caps_that_bracket_a_size():
    # a: energies 0.64, 0.30, 0.06 of 1.0 (95% at rank 3); b: 0.81, 0.19 (95% at rank 2)
    parts = [
        budget_curve.Part("a", [0.8, math.sqrt(0.30), math.sqrt(0.06)], 1.0, 100.0, 10),
        budget_curve.Part("b", [0.9, math.sqrt(0.19)], 1.0, 1.0, 30),
    ]
    sweep = budget_curve.per_layer_sweep(parts, 0.95, overhead=5)
    assert [(cap, point["bytes"]) for cap, point in sweep] == [(1, 45), (2, 85), (3, 95)]
    point = budget_curve.per_layer_at(sweep, 65)  # halfway between cap 1 (45 B) and cap 2 (85 B)
    assert point["rank_max"] == "1-2" and point["interpolated"]
    assert point["energy"] == pytest.approx(((0.64 + 0.81) / 2 + (0.94 + 1.0) / 2) / 2)
    assert budget_curve.per_layer_at(sweep, 44) is None  # smaller than every layer at rank 1
    assert budget_curve.per_layer_at(sweep, 500)["capped"]


def test_measured_figures_match_the_report_spectra(tmp_path):
    base = rl.base_weights(SHAPES, seed=0)
    deltas = {k: rl.noisy_delta(*shape, seed=i + 1) * (0.3 * 4**i) for i, (k, shape) in enumerate(SHAPES.items())}
    variant = rl.apply_delta(base, deltas)
    rl.save(base, tmp_path / "base.safetensors")
    rl.save(variant, tmp_path / "variant.safetensors")
    out, report_path = tmp_path / "lora.safetensors", tmp_path / "lora.json"
    subprocess.run([sys.executable, "-m", "lib_ckpt2lora", "--base", str(tmp_path / "base.safetensors"),
                    "--variant", str(tmp_path / "variant.safetensors"), "--out", str(out),
                    "--report-json", str(report_path), "--rank-max", "24"], check=True, capture_output=True)
    report = json.loads(report_path.read_text())
    parts, ranks = budget_curve.parts_of(report)
    assert sorted(p.key for p in parts) == sorted(SHAPES)
    measured = budget_measure.measure(tmp_path / "base.safetensors", tmp_path / "variant.safetensors",
                                      {"lora": out}, probe_count=256)["lora"]
    assert measured["problems"] == [] and measured["summary"]["layers"] == len(SHAPES)
    overhead = out.stat().st_size - sum(r * p.cost for p, r in zip(parts, ranks))
    analytic = budget_curve.figures(parts, ranks, overhead)
    assert 0 < overhead < 10_000  # the header: the costs account for every factor byte
    assert analytic["bytes"] == out.stat().st_size
    assert measured["summary"]["energy"] == pytest.approx(analytic["energy"], abs=1e-3)
    assert measured["summary"]["worst_relative_error"] == pytest.approx(analytic["worst_relative_error"], abs=1e-3)
    by_key = {x["key"]: x for x in measured["layers"]}
    for part, rank in zip(parts, ranks):
        expected = math.sqrt(1 - budget_curve.kept(part, rank) / part.total_energy)
        assert by_key[part.key]["relative_error"] == pytest.approx(expected, abs=1e-3)
        # 256 Gaussian probes estimate the same quantity within a few percent
        assert by_key[part.key]["output_error"] == pytest.approx(expected, rel=0.1)
