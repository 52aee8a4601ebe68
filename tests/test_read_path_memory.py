"""The CPU read path: deltas formed in row chunks by the reader, factors spilled to disk.

sources.read_deltas reads the base and each variant a few rows at a time into reused
buffers and subtracts into one fp32 delta; writing.SpilledTensors keeps a run's factors
in an anonymous temporary file. Both must change memory only: the deltas, ||W||^2 and
the LoRA written must equal those of the plain formula (``variant.float() - base.float()``
on whole tensors, tensors held in a dict) bit for bit; buffers reused from unit to unit
must not carry one unit's values into another; a cancelled run leaves no file behind.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile

import pytest
import realistic as rl
import tiny_models as tm
import torch
from safetensors import safe_open

from lib_ckpt2lora import sources, svd, writing
from lib_ckpt2lora.errors import Cancelled, UserError
from lib_ckpt2lora.extract import Runner, extract
from lib_ckpt2lora.options import ExtractOptions
from lib_ckpt2lora.planning import make_plan

extract_module = importlib.import_module("lib_ckpt2lora.extract")  # the package exports a function of that name
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Realistic widths (>= 1024: the randomized SVD path), plus a bias, an odd width and a 3-D
# table; blocks.3 has runs of equal sizes (mlp_out as the other mlps, transposed), as
# real blocks do, so that finished deltas are handed back and reused (SpareDeltas).
SHAPES = {
    **rl.DEFAULT_SHAPES,
    "blocks.1.proj.bias": (1024,),
    "blocks.2.odd.weight": (333, 1000),
    "blocks.2.table.weight": (1, 6, 1024),
    "blocks.3.attn_k.weight": (1024, 1024),
    "blocks.3.attn_q.weight": (1024, 1024),
    "blocks.3.attn_v.weight": (1024, 1024),
    "blocks.3.mlp.weight": (1536, 1024),
    "blocks.3.mlp_in.weight": (1536, 1024),
    "blocks.3.mlp_out.weight": (1024, 1536),
    "blocks.3.norm.weight": (1024,),
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks and energy partial sums a few KB long, so that tiny tensors take many of each."""
    monkeypatch.setattr(sources, "ROW_CHUNK_VALUES", 1 << 14)
    monkeypatch.setattr(sources, "ENERGY_CHUNK", 1 << 12)
    monkeypatch.setattr(svd, "ENERGY_CHUNK", 1 << 12)


def write_pair(folder, base_dtype=torch.bfloat16, variant_dtype=None, variant_form=None, base_form=None):
    base = rl.base_weights(SHAPES, seed=0, dtype=torch.float32)
    deltas = {
        key: rl.RELATIVE_CHANGE * rl.WEIGHT_STD * torch.randn(shape, generator=rl.generator(7)) for key, shape in SHAPES.items()
    }
    variant = rl.apply_delta(base, deltas, variant_dtype or base_dtype)
    if variant_form is not None:
        variant = variant_form(variant)
    base = {k: v.to(base_dtype) for k, v in base.items()}
    base_path = rl.save(base_form(base) if base_form is not None else base, folder / "base.safetensors")
    return base_path, rl.save(variant, folder / "variant.safetensors")


@contextlib.contextmanager
def planned(base, variant, out=None, **settings):
    opts = ExtractOptions(base=base, variant=variant, out=out, min_dim=1, **settings)
    with contextlib.ExitStack() as stack:
        yield make_plan(opts, stack, lambda line: None), opts


def plain(plan, key):
    """The old formula on whole tensors: (delta, ||W||^2)."""
    base = plan.base.read(key).float()
    return plan.sources[0].view.read(key).float() - base, svd.squared_norm(base)


def scaled_fp8(state):
    """ComfyUI's old scaled-fp8 layout (scale_weight)."""
    from test_scaled_fp8 import to_scaled_fp8

    return to_scaled_fp8({k: v.float() for k, v in state.items()})


def comfy_quant(state):
    """ComfyUI's new fp8 layout (weight_scale, comfy_quant markers)."""
    from test_comfy_quant import comfy_quantize

    return comfy_quantize({k: v.float() for k, v in state.items()})[0]


@pytest.mark.parametrize(
    "base_dtype, variant_dtype, variant_form, base_form",
    [
        (torch.bfloat16, None, None, None),
        (torch.float16, None, None, None),
        (torch.float16, torch.bfloat16, None, None),
        (torch.float32, None, None, None),
        (torch.bfloat16, torch.float32, scaled_fp8, None),
        (torch.bfloat16, torch.float32, comfy_quant, None),
        (torch.float32, torch.bfloat16, None, comfy_quant),
    ],
    ids=["bf16", "fp16", "fp16-base-bf16-variant", "fp32", "scaled-fp8-variant", "comfy-quant-variant", "comfy-quant-base"],
)
def test_chunked_delta_equals_the_plain_delta_bit_for_bit(
    tmp_path, small_chunks, base_dtype, variant_dtype, variant_form, base_form
):
    if (variant_form or base_form) and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    base, variant = write_pair(tmp_path, base_dtype, variant_dtype, variant_form, base_form)
    with planned(base, variant) as (plan, _):
        if variant_form or base_form:
            view = plan.sources[0].view if variant_form else plan.base
            assert view.scales, "the fp8 file is read dequantized"
        assert len(sources.row_chunks(SHAPES["blocks.0.mlp.weight"])) > 1
        for key in SHAPES:
            read_base, (read,) = sources.read_deltas(plan.base, key, plan.sources)
            delta, energy = plain(plan, key)
            assert read.tensor.dtype == torch.float32 and torch.equal(read.tensor, delta), key
            assert read_base.energy == energy, key  # the same partial sums, the same float64 total


def test_fused_rows_of_either_layout_read_in_chunks(tmp_path, small_chunks):
    """Z-Image's fused qkv (original layout) against split q/k/v (diffusers layout): each
    canonical part reads its own row range of the fused tensor."""
    model = tm.zimage_model(seed=0)
    base_states = model.states()
    variant_states = tm.variant_states(base_states)
    base = tm.save(tm.checkpoint_for(model, base_states, layout="original"), tmp_path / "base.safetensors", torch.bfloat16)
    variant = tm.save(
        tm.checkpoint_for(model, variant_states, layout="diffusers"), tmp_path / "variant.safetensors", torch.bfloat16
    )
    with planned(base, variant) as (plan, _):
        fused = [key for key in plan.base.shapes if plan.base.refs[key].rows is not None]
        assert fused, "the base has fused row ranges"
        for key in fused + list(plan.base.shapes)[:5]:
            read_base, (read,) = sources.read_deltas(plan.base, key, plan.sources)
            delta, energy = plain(plan, key)
            assert torch.equal(read.tensor, delta) and read_base.energy == energy, key


def test_units_in_flight_and_a_shared_base_keep_their_own_values(tmp_path, small_chunks):
    """Every unit loaded before any is used (more than the prefetch depth holds) equals its
    own plain delta; a base given by the caller (a batch shares one across its variants)
    is used as it is and left unchanged, for a second variant too."""
    base, variant = write_pair(tmp_path)
    variant2 = rl.save(
        rl.mirrored(rl.base_weights(SHAPES, dtype=torch.bfloat16), rl.base_weights(SHAPES, seed=3, dtype=torch.bfloat16)),
        tmp_path / "v2.safetensors",
    )
    with planned(base, variant) as (plan, opts), planned(base, variant2) as (plan2, opts2):
        runner = Runner(plan, opts, torch.device("cpu"), print)
        assert runner.reads_deltas
        loaded = [(unit, runner.load(unit)) for unit in plan.units]
        for unit, (bases, (items,)) in loaded:
            for part, read_base, read in zip(unit.parts, bases, items):
                delta, energy = plain(plan, part)
                # a delta on the SVD's bf16 route comes rounded (Runner.rounds), its fp32 on demand
                assert read.tensor.dtype == (torch.bfloat16 if runner.rounds(unit) else torch.float32)
                assert torch.equal(read.tensor, delta.to(read.tensor.dtype)) and read_base.energy == energy, part
                assert read.exact is None if read.tensor.dtype == torch.float32 else torch.equal(read.exact(), delta)
        runner2 = Runner(plan2, opts2, torch.device("cpu"), print)
        for unit in plan.units:
            shared = [plan.base.read(part).float() for part in unit.parts]
            kept = [tensor.clone() for tensor in shared]
            first, second = runner.load(unit, shared), runner2.load(unit, shared)
            for index, part in enumerate(unit.parts):
                assert first[0][index] is shared[index] and torch.equal(shared[index], kept[index])
                for read, own_plan in ((first[1][0][index], plan), (second[1][0][index], plan2)):
                    delta = plain(own_plan, part)[0]
                    assert torch.equal(read.tensor, delta.to(read.tensor.dtype))
                    assert read.exact is None or torch.equal(read.exact(), delta)


def lora_and_report(out):
    with safe_open(str(out), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
        metadata = handle.metadata()
    return out.read_bytes(), tensors, metadata


@pytest.mark.parametrize(
    "settings", [{}, {"detail": True, "rank": 8}, {"target_size": "0.3MB"}], ids=["rank-rule", "detail", "budget"]
)
def test_lora_equals_the_one_from_the_old_formula(tmp_path, monkeypatch, settings):
    """The whole run, new path (chunks, spilled factors) against the old one (whole tensors
    widened to fp32, the delta on the compute thread, factors in a dict): the same file,
    byte for byte, and the same report."""
    base, variant = write_pair(tmp_path)
    monkeypatch.setattr(writing, "SPILL_MIN_BYTES", 1024)
    reused, take = [], sources.SpareDeltas.take

    def counting_take(self, shape, dtype=torch.float32):
        spare = [tensor.data_ptr() for tensor in self._spare]
        tensor = take(self, shape, dtype)
        reused.append(tensor.data_ptr() in spare)
        return tensor

    monkeypatch.setattr(sources.SpareDeltas, "take", counting_take)
    runs = {}
    for name in ("new", "old"):
        with monkeypatch.context() as patch:
            if name == "old":
                patch.setattr(extract_module, "CheckpointSource", type(None))  # Runner: not a checkpoint -> old path
                patch.setattr(writing, "SPILL_MIN_BYTES", 1 << 62)  # every tensor held in memory
            out = tmp_path / name / "lora.safetensors"
            out.parent.mkdir()
            opts = ExtractOptions(base=base, variant=variant, out=out, **settings)
            result = extract(opts, log=lambda line: None)
            runs[name] = (lora_and_report(out), [layer.__dict__ for layer in result.report.layers], result.outputs)
    (new_bytes, new_tensors, _), new_layers, new_outputs = runs["new"]
    (old_bytes, old_tensors, _), old_layers, old_outputs = runs["old"]
    assert list(new_tensors) == list(old_tensors) and all(torch.equal(new_tensors[k], old_tensors[k]) for k in old_tensors)
    assert new_bytes == old_bytes
    assert new_layers == old_layers
    assert sum(reused) >= 2, "finished deltas were reused"
    for new, old in zip(new_outputs[1:], old_outputs[1:]):  # the detail LoRA
        assert new.read_bytes() == old.read_bytes()


def test_spilled_tensors_read_back_and_write_the_same_file(tmp_path, monkeypatch):
    monkeypatch.setattr(writing, "SPILL_MIN_BYTES", 4096)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.lora_down.weight": torch.randn(16, 1024, generator=gen).to(torch.bfloat16),
        "a.lora_up.weight": torch.randn(1024, 16, generator=gen).to(torch.float16),
        "a.alpha": torch.tensor(16.0),
        "b.diff": torch.randn(7, generator=gen),
    }
    spilled = writing.SpilledTensors(tmp_path)
    for key, value in tensors.items():
        spilled[key] = value
    assert spilled._file is not None and isinstance(spilled._entries["a.lora_down.weight"], tuple), "the big ones spilled"
    assert not isinstance(spilled._entries["a.alpha"], tuple), "the small ones stay in memory"
    assert list(spilled) == list(tensors) and all(
        torch.equal(spilled[k], v) and spilled[k].dtype == v.dtype for k, v in tensors.items()
    )
    assert spilled.info("a.lora_up.weight") == (torch.float16, (1024, 16))
    writing.write_tensors(tmp_path / "from_dict.safetensors", tensors, {"x": "1"}, False)
    writing.write_tensors(tmp_path / "from_spill.safetensors", spilled, {"x": "1"}, False)
    assert (tmp_path / "from_dict.safetensors").read_bytes() == (tmp_path / "from_spill.safetensors").read_bytes()
    file = spilled._file
    spilled.close()
    assert file.closed and len(spilled) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["from_dict.safetensors", "from_spill.safetensors"]


def test_a_refused_spill_keeps_the_tensors_in_memory(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(writing, "SPILL_MIN_BYTES", 16)
    monkeypatch.setattr(writing.tempfile, "TemporaryFile", refuse)
    spilled = writing.SpilledTensors(tmp_path)
    value = torch.arange(100.0)
    spilled["x"] = value
    assert spilled["x"] is value


def test_a_cancelled_run_leaves_nothing_and_closes_its_spill_file(tmp_path, monkeypatch):
    base, variant = write_pair(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(writing, "SPILL_MIN_BYTES", 1024)
    opened, original = [], tempfile.TemporaryFile

    def recording(*args, **kwargs):
        opened.append(original(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(writing.tempfile, "TemporaryFile", recording)
    calls = []

    def stop_after_two_units():
        calls.append(1)
        return len(calls) > 2

    opts = ExtractOptions(base=base, variant=variant, out=out_dir / "lora.safetensors", detail=True, rank=8)
    with pytest.raises(Cancelled):
        extract(opts, should_stop=stop_after_two_units, log=lambda line: None)
    assert opened and opened[0].name is not None, "the factors went to a spill file"
    assert all(file.closed for file in opened)
    assert list(out_dir.iterdir()) == []


def test_a_spill_that_cannot_be_read_back_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(writing, "SPILL_MIN_BYTES", 16)
    spilled = writing.SpilledTensors(tmp_path)
    spilled["x"] = torch.arange(100.0)

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spilled._file, "readinto", fail)
    with pytest.raises(UserError, match="free some disk space"):
        spilled["x"]
    spilled.close()
