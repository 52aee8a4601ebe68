"""Batch extraction (issue 20 item 3): several variants against one base in one pass.

Realistic pairs (bf16 weights, full-rank noisy deltas, widths >= 1024 so the randomized
SVD runs): each batch output must equal the single run's output for that variant, bit
for bit (each variant keeps its own seeded generator and sees the same units), with the
same ranks; every base tensor must be read once however many variants there are; a
variant that fails is named and skipped while the others are written; an interrupt
leaves no partial file. A tiny real SD1.5 pair proves each batch LoRA loads in
diffusers with every module injected and reproduces its own variant.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import loader_checks as lc
import pytest
import realistic as rl
import tiny_models as tm
import torch
from _feature_models import silent_log
from safetensors.torch import load_file

from lib_ckpt2lora.errors import Cancelled, UserError
from lib_ckpt2lora.extract import extract
from lib_ckpt2lora.options import ExtractOptions
from lib_ckpt2lora.reading import TensorFile
from lib_ckpt2lora.toolbox.batch import extract_batch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base and three variants of it (different deltas), plus a LoRA variant."""
    folder = tmp_path_factory.mktemp("batch_pairs")
    base = rl.base_weights(seed=0)
    files = {"base": rl.save(base, folder / "base.safetensors")}
    for seed, name in ((1, "anime"), (2, "photo"), (3, "style")):
        deltas = {key: rl.noisy_delta(*weight.shape, seed=seed * 10 + index) for index, (key, weight) in enumerate(base.items())}
        files[name] = rl.save(rl.apply_delta(base, deltas), folder / f"{name}.safetensors")
    # A LoRA as a variant (here: style's own LoRA at a fixed rank), as a single run reads one.
    extract(
        ExtractOptions(base=files["base"], variant=files["style"], out=folder / "style_lora.safetensors", rank=16),
        log=silent_log,
    )
    files["style_lora"] = folder / "style_lora.safetensors"
    return files


def single_runs(pairs, names, folder: Path, **settings) -> dict:
    """name -> the ExtractResult of a plain run into ``folder/<name>.safetensors``."""
    folder.mkdir()
    return {
        name: extract(
            ExtractOptions(base=pairs["base"], variant=pairs[name], out=folder / f"{name}.safetensors", **settings),
            log=silent_log,
        )
        for name in names
    }


@pytest.fixture
def count_reads(monkeypatch) -> Counter:
    """Every tensor read, as (file name, key) -> times read (a read of a row or value range
    counts as its share: the CPU reader reads big tensors in chunks)."""
    reads: Counter = Counter()
    original = TensorFile.get

    def counted(self, key, rows=None, **kwargs):
        shape = (self.infos.get(key) or self.scale_infos[key]).shape
        reads[(self.path.name, key)] += Fraction(rows[1] - rows[0], shape[0]) if rows else 1
        return original(self, key, rows, **kwargs)

    original_values = TensorFile.read_values

    def counted_values(self, key, begin, end, out=None):  # the CPU reader's flat chunks
        info = self.infos.get(key) or self.scale_infos[key]
        reads[(self.path.name, key)] += Fraction(end - begin, info.numel)
        return original_values(self, key, begin, end, out)

    monkeypatch.setattr(TensorFile, "get", counted)
    monkeypatch.setattr(TensorFile, "read_values", counted_values)
    return reads


@pytest.mark.parametrize(
    "settings",
    [{}, {"rank": 24, "save_dtype": "fp32"}, {"target_size": "0.5MB"}, {"rank": 8, "detail": True}],
    ids=["rank-rule", "fixed-rank-fp32", "target-size", "detail"],
)
def test_each_output_equals_its_single_run_and_the_base_is_read_once(pairs, tmp_path, count_reads, settings):
    names = ["anime", "photo", "style_lora"]
    batch_dir = tmp_path / "batch"
    batch_dir.mkdir()
    options = ExtractOptions(base=pairs["base"], variant=pairs["anime"], out=None, **settings)
    batch = extract_batch(options, [pairs[name] for name in names], batch_dir, log=silent_log)
    assert [outcome.error for outcome in batch.outcomes] == [None] * 3

    base_keys = set(rl.DEFAULT_SHAPES)
    base_reads = {key: count for (file, key), count in count_reads.items() if file == "base.safetensors"}
    assert base_reads == dict.fromkeys(base_keys, 1), "each base tensor read exactly once for all variants"
    for name in ("anime", "photo"):
        assert {k: c for (f, k), c in count_reads.items() if f == f"{name}.safetensors"} == dict.fromkeys(base_keys, 1)

    singles = single_runs(pairs, names, tmp_path / "single", **settings)
    for name, outcome in zip(names, batch.outcomes):
        single = singles[name]
        assert outcome.out == batch_dir / f"{name}.safetensors" and outcome.result.outputs[0] == outcome.out
        assert [path.name for path in outcome.result.outputs] == [path.name for path in single.outputs]
        for path in outcome.result.outputs:  # the LoRA (and with --detail its detail LoRA)
            got, want = load_file(str(path)), load_file(str(tmp_path / "single" / path.name))
            assert set(got) == set(want) and got
            different = [key for key in want if not torch.equal(got[key], want[key])]
            assert not different, f"{path.name}: {len(different)} tensors differ from the single run, e.g. {different[:3]}"
        ranks = {layer.name: layer.rank for layer in outcome.result.report.layers}
        assert ranks == {layer.name: layer.rank for layer in single.report.layers}
        assert len(set(ranks.values())) >= 1 and all(rank > 0 for rank in ranks.values())
    if "detail" in settings:
        assert all(len(outcome.result.outputs) == 2 for outcome in batch.outcomes)
    if "target_size" in settings:
        for outcome in batch.outcomes:  # the budget is each file's own
            assert 450_000 < outcome.out.stat().st_size <= 500_000


def truncated_copy(source: Path, target: Path) -> Path:
    """The file cut short: a sound header, the last tensor's data missing (a broken download)."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) - 1_000_000])
    return target


def test_failing_variants_are_named_and_skipped(pairs, sd15_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    identical = shutil.copy(pairs["base"], tmp_path / "same_as_base.safetensors")
    damaged = truncated_copy(pairs["photo"], tmp_path / "damaged.safetensors")
    other_family = sd15_files["base"]
    missing = tmp_path / "missing.safetensors"
    variants = [pairs["anime"], missing, identical, damaged, other_family, pairs["style"]]
    options = ExtractOptions(base=pairs["base"], variant=pairs["anime"], out=None)
    batch = extract_batch(options, variants, out, log=silent_log)

    errors = {outcome.variant.name: outcome.error for outcome in batch.outcomes}
    assert errors["anime.safetensors"] is None and errors["style.safetensors"] is None
    assert "missing.safetensors" in errors["missing.safetensors"] and "does not exist" in errors["missing.safetensors"]
    assert "No difference" in errors["same_as_base.safetensors"]
    assert "damaged.safetensors" in errors["damaged.safetensors"] and "truncated" in errors["damaged.safetensors"]
    assert "SD" in errors[other_family.name] and other_family.name in errors[other_family.name]
    assert [outcome.variant.name for outcome in batch.failed] == [v.name for v in variants[1:5]]
    assert sorted(path.name for path in out.iterdir()) == ["anime.safetensors", "style.safetensors"]


def test_existing_output_fails_that_variant_only_and_is_kept(pairs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.safetensors").write_bytes(b"keep me")
    options = ExtractOptions(base=pairs["base"], variant=pairs["anime"], out=None)
    batch = extract_batch(options, [pairs["anime"], pairs["photo"]], out, log=silent_log)
    assert [outcome.variant.name for outcome in batch.failed] == ["photo.safetensors"]
    assert "already exists" in batch.failed[0].error
    assert (out / "photo.safetensors").read_bytes() == b"keep me" and (out / "anime.safetensors").exists()


def test_whole_run_problems_are_refused_before_any_work(pairs, tmp_path):
    options = ExtractOptions(base=pairs["base"], variant=pairs["anime"], out=None)
    with pytest.raises(UserError, match="existing folder"):
        extract_batch(options, [pairs["anime"], pairs["photo"]], tmp_path / "nope", log=silent_log)
    twin = tmp_path / "other"
    twin.mkdir()
    shutil.copy(pairs["anime"], twin / "anime.safetensors")
    with pytest.raises(UserError, match="both be written as"):
        extract_batch(options, [pairs["anime"], twin / "anime.safetensors"], tmp_path, log=silent_log)
    checkpoint = ExtractOptions(base=pairs["base"], variant=pairs["anime"], out=None, checkpoint=True)
    with pytest.raises(UserError, match="single --variant"):
        extract_batch(checkpoint, [pairs["anime"], pairs["photo"]], tmp_path, log=silent_log)
    lora_base = ExtractOptions(base=pairs["style_lora"], variant=pairs["anime"], out=None)
    with pytest.raises(UserError, match="is a LoRA"):
        extract_batch(lora_base, [pairs["anime"], pairs["photo"]], tmp_path, log=silent_log)
    assert not list(tmp_path.glob("*.safetensors"))


def stop_after(calls: int):
    """A should_stop that says stop at its ``calls``-th question."""
    asked = Counter()

    def should_stop() -> bool:
        asked["n"] += 1
        return asked["n"] >= calls

    return should_stop


def test_interrupt_while_streaming_writes_nothing(pairs, tmp_path):
    options = ExtractOptions(base=pairs["base"], variant=pairs["anime"], out=None)
    with pytest.raises(Cancelled, match="nothing was written"):
        extract_batch(options, [pairs["anime"], pairs["photo"]], tmp_path, should_stop=stop_after(4), log=silent_log)
    assert list(tmp_path.iterdir()) == []  # no output, no .part temporary


def test_interrupt_while_writing_keeps_the_finished_loras_only(pairs, tmp_path):
    options = ExtractOptions(base=pairs["base"], variant=pairs["anime"], out=None)
    variants = [pairs["anime"], pairs["photo"], pairs["style"]]
    units = 3 * len(rl.DEFAULT_SHAPES)  # one question per (layer, variant), then one per write
    with pytest.raises(Cancelled, match="anime.safetensors") as stopped:
        extract_batch(options, variants, tmp_path, should_stop=stop_after(units + 2), log=silent_log)
    assert "not written" in str(stopped.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["anime.safetensors"]
    assert load_file(str(tmp_path / "anime.safetensors"))


# -- a real loader --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_files(tmp_path_factory):
    """A tiny SD1.5 checkpoint pair set: the base and two variants with different deltas."""
    folder = tmp_path_factory.mktemp("batch_sd15")
    with lc.one_thread():
        pair = lc.make_pair(tm.sd15_model(seed=0), folder)
        second = tm.variant_states(pair.base, seed=2)
        second_path = tm.save(tm.checkpoint_for(pair.model, second), folder / "variant_b.safetensors")
    return {
        "pair": pair,
        "base": pair.base_path,
        "pairs": [pair, lc.Pair(pair.model, pair.base, second, pair.base_path, second_path)],
    }


def test_each_sd15_output_loads_in_diffusers_with_every_module_used(sd15_files, tmp_path):
    from test_loaders_sd15 import NOT_LORA, pipeline_for

    pairs = sd15_files["pairs"]
    options = ExtractOptions(
        base=sd15_files["base"], variant=pairs[0].variant_path, out=None, min_dim=1, save_dtype="fp32", rank_thresh=0.9999
    )
    batch = extract_batch(options, [pair.variant_path for pair in pairs], tmp_path, log=silent_log)
    assert not batch.failed and batch.architecture == "sd15"
    for pair, outcome in zip(pairs, batch.outcomes):
        result, path = outcome.result, outcome.out
        assert path == tmp_path / pair.variant_path.name
        lora = lc.check_report_matches_file(result, path)
        written = lc.written_params(pair.model, result)
        lc.assert_coverage(pair, written, NOT_LORA)
        model = pair.model.copy_with(pair.base)
        pipeline = pipeline_for(model)
        messages, injected = lc.diffusers_load(pipeline, path, model.components)
        assert not lc.key_complaints(messages), messages
        lc.assert_injected(injected, written, len(lc.lora_module_names(lora)), "diffusers")
        pipeline.fuse_lora()
        loaded = {name: lc.clean_state(module) for name, module in model.components.items()}
        assert lc.assert_weights(pair, loaded, written, "diffusers") == len(result.report.layers)


# -- the command line -----------------------------------------------------------------------------


def test_cli_batch_reports_per_variant_and_exits_2_when_one_failed(pairs, tmp_path):
    out, reports = tmp_path / "out", tmp_path / "reports"
    out.mkdir()
    reports.mkdir()
    missing = tmp_path / "gone.safetensors"
    command = [sys.executable, "-m", "lib_ckpt2lora", "--base", str(pairs["base"]), "--variant"]
    command += [str(pairs["anime"]), str(missing), str(pairs["photo"])]
    command += ["--out", str(out), "--summary", "--report-json", str(reports)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith(("Saved", "FAILED"))] == [
        ["Saved", "anime.safetensors:"],
        ["FAILED", "gone.safetensors:"],
        ["Saved", "photo.safetensors:"],
    ]
    assert "== anime.safetensors ==" in done.stdout and "== photo.safetensors ==" in done.stdout
    assert sorted(path.name for path in out.iterdir()) == ["anime.safetensors", "photo.safetensors"]
    assert sorted(path.name for path in reports.iterdir()) == ["anime.json", "photo.json"]
