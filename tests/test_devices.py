"""Device choice, the per-step CPU fallback for what Apple's MPS lacks, and TF32 restored.

There is no Mac or GPU here: selection is tested by monkeypatching what torch reports
(``torch.cuda.is_available``, ``torch.backends.mps.is_available``), and the fallback by
routing the CPU itself through it, and by an op that raises NotImplementedError the way
MPS does. A real MPS run is not tested (see the README's platform table).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _bad_inputs import assert_clean_failure, assert_one_sentence, run_cli_inprocess

from lib_ckpt2lora import devices, svd
from lib_ckpt2lora.devices import fast_matmuls, on_supporting_device, resolve_device
from lib_ckpt2lora.errors import UserError
from lib_ckpt2lora.options import ExtractOptions

# The package exports a function of that name; import_module gives the module (also when
# this file runs alone, before anything else imported it).
extract_module = importlib.import_module("lib_ckpt2lora.extract")


def machine(monkeypatch, cuda: bool, mps: bool | None) -> None:
    """What torch reports; ``mps=None``: a torch without the MPS backend (older builds)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if mps is None:
        monkeypatch.delattr(torch.backends, "mps", raising=False)
    else:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    "cuda, mps, expected",
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu"), (False, None, "cpu")],
)
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    machine(monkeypatch, cuda, mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("") == torch.device(expected)


def test_mps_asked_for(monkeypatch):
    machine(monkeypatch, False, True)
    assert resolve_device("MPS") == torch.device("mps")
    for mps in (False, None):
        machine(monkeypatch, False, mps)
        with pytest.raises(UserError) as caught:
            resolve_device("mps")
        assert_one_sentence(str(caught.value))
        assert "--device mps" in str(caught.value) and "--device cpu" in str(caught.value)


def test_mps_runtime_that_raises_counts_as_absent(monkeypatch):
    def broken():
        raise RuntimeError("MPS backend failed to initialise")

    monkeypatch.setattr(torch.backends.mps, "is_available", broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_cli_device_mps_without_one(monkeypatch, tmp_path):
    machine(monkeypatch, False, False)
    proc = run_cli_inprocess(["--base", tmp_path / "b.safetensors", "--variant", tmp_path / "v.safetensors",
                              "--out", tmp_path / "x.safetensors", "--device", "mps"])
    assert_clean_failure(proc, "--device mps")


def test_unknown_device(monkeypatch):
    with pytest.raises(UserError) as caught:
        resolve_device("tpu")
    assert "mps" in str(caught.value)
    assert_one_sentence(str(caught.value))


# -- the per-step fallback ---------------------------------------------------------------------
def realistic_delta(rows: int = 1024, cols: int = 768, seed: int = 0) -> torch.Tensor:
    """A decaying spectrum plus dense noise, rounded to bf16: the randomized SVD path."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, 96, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(cols, 96, generator=generator))[0]
    spectrum = torch.logspace(0, -2, 96)
    delta = (u * spectrum) @ v.T
    delta += 0.3 * delta.norm() / (rows * cols) ** 0.5 * torch.randn(rows, cols, generator=generator)
    return delta.to(torch.bfloat16).float()


def test_steps_a_device_lacks_go_through_the_cpu(monkeypatch):
    """With the CPU marked as lacking the decompositions (standing in for MPS), every QR
    and SVD of a randomized factorization goes through the CPU route, with the same result."""
    delta = realistic_delta()
    # As on such a device: fp32 products (the bf16 ones are the CPU's own) and Householder's
    # QR (the CPU's own route is Cholesky QR): the same steps, the same result.
    monkeypatch.setattr(svd, "BF16_ON_CPU", False)
    monkeypatch.setattr(svd, "CHOLESKY_QR_CONDITION", 2.0)
    expected = svd.factorize(delta, cap=64, generator=torch.Generator().manual_seed(0))
    routed = []
    real_via_cpu = devices._via_cpu

    def via_cpu(op, tensor, *args, **kwargs):
        routed.append(op.__name__)
        return real_via_cpu(op, tensor, *args, **kwargs)

    monkeypatch.setattr(devices, "NO_DECOMPOSITIONS", {"cpu"})
    monkeypatch.setattr(devices, "_via_cpu", via_cpu)
    got = svd.factorize(delta, cap=64, generator=torch.Generator().manual_seed(0))
    # The sketch's QR, two per Krylov iteration (at least the minimum), then the Ritz step's SVD.
    assert routed.count("linalg_qr") >= 1 + 2 * svd.MIN_POWER_ITERATIONS
    assert routed.count("linalg_svd") == 1
    assert got.rank == expected.rank
    assert torch.allclose(got.up @ got.down, expected.up @ expected.down, atol=1e-5)


def lacking_on(device_type: str):
    """An op the way a backend lacks it: NotImplementedError for tensors on ``device_type``."""
    calls = []

    def op(tensor, scale=1.0):
        calls.append(tensor.device.type)
        if tensor.device.type == device_type:
            raise NotImplementedError(f"op is not implemented for {device_type}")
        return tensor * scale, tensor + 1

    return op, calls


def test_not_implemented_on_the_cpu_propagates():
    op, calls = lacking_on("cpu")
    with pytest.raises(NotImplementedError):
        on_supporting_device(op, torch.ones(2))
    assert calls == ["cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (runs on the GPU machine)")
def test_not_implemented_on_a_device_runs_on_the_cpu_and_comes_back():
    op, calls = lacking_on("cuda")
    scaled, shifted = on_supporting_device(op, torch.ones(2, device="cuda"), scale=3.0)
    assert calls == ["cuda", "cpu"]
    assert scaled.device.type == "cuda" and shifted.device.type == "cuda"
    assert torch.equal(scaled.cpu(), torch.full((2,), 3.0)) and torch.equal(shifted.cpu(), torch.full((2,), 2.0))


def test_float64_where_the_device_has_none():
    values = torch.tensor([3.0, 4.0])
    assert devices.to_float64(values).dtype == torch.float64
    assert svd.squared_norm(values) == 25.0


# -- TF32 ---------------------------------------------------------------------------------------
@pytest.fixture
def tf32_off():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_tf32_on_for_a_cuda_run_then_restored(tf32_off):
    with fast_matmuls(torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(KeyError), fast_matmuls(torch.device("cuda")):
        raise KeyError("a failing run")
    assert not torch.backends.cuda.matmul.allow_tf32
    with fast_matmuls(torch.device("cpu")):
        assert not torch.backends.cuda.matmul.allow_tf32


def test_choosing_cuda_leaves_tf32_alone(monkeypatch, tf32_off):
    machine(monkeypatch, True, False)
    resolve_device("cuda")
    resolve_device("auto")
    assert not torch.backends.cuda.matmul.allow_tf32


def test_extract_restores_tf32(monkeypatch, tmp_path, tf32_off):
    """extract() on a (pretended) CUDA device: TF32 on during the run, off after it, also
    when the run fails."""
    seen = []

    def failing_plan(opts, stack, log):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        raise UserError("stop here.")

    monkeypatch.setattr(extract_module, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(extract_module, "make_plan", failing_plan)
    opts = ExtractOptions(base=tmp_path / "b.safetensors", variant=tmp_path / "v.safetensors", out=tmp_path / "x.safetensors")
    monkeypatch.setattr(ExtractOptions, "validate", lambda self: None)
    with pytest.raises(UserError):
        extract_module.extract(opts, log=lambda _m: None)
    assert seen == [True]
    assert not torch.backends.cuda.matmul.allow_tf32
