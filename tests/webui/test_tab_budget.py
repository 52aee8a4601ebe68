"""The tab's side of issue 12: the "Target size (MB)" field, its refusals in the tab's words,
what a budget run chose shown in the result, and the layout / wiring split's one-way imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from uihelpers import form_inputs, run_event, standalone_tab

from lib_ckpt2lora.budget import parse_size
from lib_ckpt2lora.errors import UserError
from lib_ckpt2lora.ui import job
from lib_ckpt2lora.ui.tab_wiring import status_html

PACKAGE = Path(__file__).resolve().parents[2] / "lib_ckpt2lora"

# Shaped like the contract's Report.to_dict()["budget"] (the engine's, issue 12).
BUDGET = {
    "target_bytes": 100_000_000,
    "target_energy": None,
    "objective": "relative",
    "bytes": 98_765_432,
    "captured_objective": 0.9512,
    "captured_energy": 0.9321,
    "layers": 412,
    "at_floor": 12,
    "at_cap": 37,
    "groups": [
        {"level": "IN04", "type": "attn", "auxiliary": False, "n": 10, "rank": 12.25, "bytes": 60_000_000},
        {"level": "MID", "type": "ff", "auxiliary": False, "n": 1, "rank": 3.0, "bytes": 30_000_000},
        {"level": "TE", "type": "attn", "auxiliary": True, "n": 2, "rank": 1.0, "bytes": 8_000_000},
        {"level": "OUT0", "type": "conv", "auxiliary": False, "n": 3, "rank": 2.0, "bytes": 42_000},
    ],
}


@pytest.fixture
def tab(tmp_path):
    return standalone_tab(tmp_path)


inputs = form_inputs


# -- the field ---------------------------------------------------------------------------
def test_target_size_field_is_labelled_as_the_engine_messages_name_it(tab):
    components = tab[0].ckpt2lora.components
    assert components["target_size"].label == job.FLAG_LABELS["--target-size"] == "Target size (MB)"
    assert "Rank must be 0" in components["target_size"].info  # said where the size is typed
    assert job.Form().target_size == 0  # the default is today's per-layer rule
    for flag in ("--target-energy", "--budget-objective"):
        assert "command line only" in job.FLAG_LABELS[flag]


@pytest.mark.parametrize(
    ("value", "option"),
    [(None, ""), ("", ""), (0, ""), (0.0, ""), (100, "100MB"), (100.0, "100MB"), (1.5, "1.5MB"), (0.00001, "0.00001MB")],
)
def test_target_size_option(value, option):
    assert job.target_size_option(value) == option
    if option:  # the engine reads it as the same number of bytes (MB = 10^6), never "1e-05MB"
        assert parse_size(option) == pytest.approx(float(value) * 1e6, abs=1)


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "many"])
def test_a_target_size_that_is_not_a_size_is_one_sentence_in_the_tabs_words(value):
    with pytest.raises(UserError, match=r"^'Target size \(MB\)' must be 0 \(the per-layer rule\) or a size in MB"):
        job.target_size_option(value)


def test_target_size_reaches_the_engines_options(tab):
    services = tab[0].ckpt2lora.services
    form = job.Form(base="base.safetensors", variant="tuned.safetensors", name="sized", target_size=2.5)
    opts = job.plan_job(services, form).opts
    assert opts.target_size == "2.5MB" and opts.has_budget and opts.rank == 0
    per_layer = job.plan_job(services, job.Form(base="base.safetensors", variant="tuned.safetensors", name="x")).opts
    assert per_layer.target_size == "" and not per_layer.has_budget


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rank": 4}, ["'Target size (MB)'", "'Rank'", "'Max rank'"]),
        ({"output_kind": job.OUTPUT_KINDS[1]}, ["'Target size (MB)'", "checkpoint"]),
        ({"output_kind": job.OUTPUT_KINDS[2]}, ["'Target size (MB)'", "checkpoint"]),
        ({"detail": True}, ["'Detail'", "'Target size (MB)'"]),
        ({"target_size": -3}, ["'Target size (MB)'"]),
    ],
)
def test_target_size_refuses_what_the_engine_refuses_in_the_tabs_words(tab, changes, named):
    blocks, models, loras = tab
    before = sorted(p.name for p in models.iterdir()) + sorted(p.name for p in loras.iterdir())
    form = inputs(**{"base": "base.safetensors", "variant": "tuned.safetensors", "name": "sized", "target_size": 1, **changes})
    status = run_event(blocks, blocks.ckpt2lora.handler, form)[-1]
    assert "ckpt2lora-error" in status, status
    for words in named:
        assert words.replace("'", "&#x27;") in status, (words, status)
    assert not re.search(r"--[a-z]", status), status
    assert sorted(p.name for p in models.iterdir()) + sorted(p.name for p in loras.iterdir()) == before


# -- what the budget chose ------------------------------------------------------------------
def test_budget_text_says_what_the_budget_chose_in_the_tabs_words():
    text = job.budget_text({"budget": BUDGET})
    assert text.summary == [
        "Target size 100 MB: the LoRA takes 98.8 MB (98,765,432 bytes, 98.8% of the target).",
        "It keeps 93.2% of the difference's energy over the whole model (95.1% of the 'relative' objective "
        "the ranks were chosen for); 412 layers: 37 at 'Max rank', 12 at rank 1.",
    ]
    assert text.groups == [
        "IN04 attn: 10 layers, rank 12.2 on average, 60.0 MB (61.2% of the bytes)",
        "MID ff: 1 layer, rank 3.0 on average, 30.0 MB (30.6% of the bytes)",
        "[Aux] TE attn: 2 layers, rank 1.0 on average, 8.00 MB (8.2% of the bytes)",
        "OUT0 conv: 3 layers, rank 2.0 on average, 42.0 KB (0.0% of the bytes)",
    ]
    for line in text.summary + text.groups:
        assert not re.search(r"--[a-z]", line)


def test_budget_text_for_a_target_energy_and_without_a_budget():
    energy = dict(BUDGET, target_bytes=None, target_energy=0.9, groups=[])
    text = job.budget_text({"budget": energy})
    assert text.summary[0] == "Target energy 90.0%: the LoRA takes 98.8 MB (98,765,432 bytes)."
    assert text.groups == []
    assert job.budget_text({"budget": None}) is None
    assert job.budget_text({}) is None and job.budget_text(None) is None


def _ok_result(report):
    return job.JobResult(
        ok=True, message="Saved x.", kind="lora", name="x", outputs=[Path("x.safetensors")], sizes=[98_765_432], report=report
    )


def test_the_result_shows_the_budget_only_after_a_budget_run():
    shown = status_html(_ok_result({"budget": BUDGET}))
    assert "class='ckpt2lora-budget'" in shown
    assert "Target size 100 MB: the LoRA takes 98.8 MB" in shown
    assert "<li>[Aux] TE attn: 2 layers, rank 1.0 on average" in shown
    assert "ckpt2lora-budget" not in status_html(_ok_result({"budget": None}))


def test_the_lora_cards_description_names_the_budget(tab):
    services = tab[0].ckpt2lora.services
    form = job.Form(base="base.safetensors", variant="tuned.safetensors", name="sized", target_size=100)
    plan = job.plan_job(services, form)
    text = job.describe(plan, {"total": {"n": 412, "energy": 0.5}, "budget": BUDGET})
    assert "ranks chosen across all layers for 100 MB (at most 64 per layer)" in text
    assert "93.2% of the difference captured over the whole model" in text


# -- the layout / wiring split ----------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """The modules a file imports, relative ones resolved against lib_ckpt2lora."""
    names = set()
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_layout_and_wiring_import_one_way_and_the_engine_never_imports_the_ui():
    ui = PACKAGE / "ui"
    layout, wiring = _imports(ui / "tab_layout.py"), _imports(ui / "tab_wiring.py")
    assert "lib_ckpt2lora.ui.tab_layout" in wiring or "lib_ckpt2lora.ui.tab_layout.model_choices" in wiring
    assert not {"lib_ckpt2lora.ui.tab_wiring", "lib_ckpt2lora.ui.tab"} & layout
    assert "lib_ckpt2lora.ui.tab" not in wiring
    for source in PACKAGE.glob("*.py"):  # the engine (the ui package aside) imports no ui module
        assert not [name for name in _imports(source) if name.startswith("lib_ckpt2lora.ui")], source.name


# -- end to end: a real extraction with a target size, through the tab ------------------------
def test_a_target_size_run_writes_at_most_the_target_and_shows_what_it_chose(tab):
    blocks, models, loras = tab
    form = inputs(base="base.safetensors", variant="tuned.safetensors", name="sized", target_size=0.05)
    updates = run_event(blocks, blocks.ckpt2lora.handler, form)
    status = updates[-1]
    assert "ckpt2lora-ok" in status and "ckpt2lora-error" not in status, status
    written = (loras / "sized.safetensors").stat().st_size
    assert 0 < written <= 50_000  # 0.05 MB, MB = 10^6 bytes
    assert f"Target size 0.05 MB: the LoRA takes {written / 1e3:.1f} KB ({written:,} bytes," in status
    assert "of the difference&#x27;s energy over the whole model" in status
    assert status.count("<li>") >= 2 and "% of the bytes)</li>" in status  # the saved file, then one per group
    assert not re.search(r"--[a-z]", status)


def test_a_target_size_too_small_for_rank_1_everywhere_is_one_sentence_and_writes_nothing(tab):
    blocks, models, loras = tab
    form = inputs(base="base.safetensors", variant="tuned.safetensors", name="tiny", target_size=0.001)
    status = run_event(blocks, blocks.ckpt2lora.handler, form)[-1]
    assert "ckpt2lora-error" in status and "too small" in status and "smallest possible size" in status, status
    assert "&#x27;Target size (MB)&#x27;" in status and not re.search(r"--[a-z]", status)
    assert list(loras.iterdir()) == []
