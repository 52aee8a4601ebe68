"""The CLI's thread policy on the CPU (cli._leave_a_core_for_the_reader): the reader thread's
operations on one thread (prefetch.READER_THREADS), torch's intra-op threads one fewer than
the CPUs the process may use and no more than torch's default; an explicit OMP_NUM_THREADS
keeps the computing count, a run on a GPU is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_ckpt2lora import cli, prefetch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def calls(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(prefetch, "READER_THREADS", None)  # restored after the test
    made = []
    monkeypatch.setattr(torch, "set_num_threads", made.append)
    return made


def machine(monkeypatch, cpus: int, torch_default: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_default)


@pytest.mark.parametrize(
    ("cpus", "torch_default", "expected"),
    [
        (2, 2, [1]),  # this project's machine: one compute thread beside the reader
        (8, 8, [7]),
        (16, 8, []),  # SMT: torch already uses the physical cores only
        (1, 1, []),
    ],
)
def test_one_cpu_is_left_to_the_reader(monkeypatch, calls, cpus, torch_default, expected):
    machine(monkeypatch, cpus, torch_default)
    cli._leave_a_core_for_the_reader("cpu")
    assert calls == expected
    assert prefetch.READER_THREADS == 1


def test_an_explicit_thread_count_is_kept(monkeypatch, calls):
    machine(monkeypatch, 8, 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    cli._leave_a_core_for_the_reader("cpu")
    assert calls == []
    assert prefetch.READER_THREADS == 1  # the reader's own operations: one thread all the same


def test_a_gpu_run_is_left_alone(monkeypatch, calls):
    machine(monkeypatch, 8, 8)
    from lib_ckpt2lora import devices

    monkeypatch.setattr(devices, "resolve_device", lambda name: torch.device("cuda"))
    cli._leave_a_core_for_the_reader("auto")
    assert calls == []
    assert prefetch.READER_THREADS is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs os.sched_getaffinity (Linux)")
def test_a_real_run_computes_and_reads_with_that_count(tmp_path):
    """A CLI run in a fresh process without OMP_NUM_THREADS: the computing thread runs torch
    with min(torch's default, CPUs - 1) threads, the reader thread with one."""
    gen = torch.Generator().manual_seed(0)
    base = {f"blocks.{i}.proj.weight": torch.randn(96, 160, generator=gen) for i in range(4)}
    variant = {key: value + 0.05 * torch.randn(value.shape, generator=gen) for key, value in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(variant, tmp_path / "variant.safetensors")
    script = textwrap.dedent(
        """
        import importlib, json, os, sys, threading
        import torch
        sys.path.insert(0, sys.argv[1])
        default = torch.get_num_threads()
        extract = importlib.import_module("lib_ckpt2lora.extract")
        from lib_ckpt2lora import cli, prefetch
        seen = {}
        load, compute = extract.Runner.load, extract.Runner.compute
        def watched(real, role):
            def call(self, *args, **kwargs):
                seen.setdefault(role, (threading.current_thread().name, torch.get_num_threads()))
                return real(self, *args, **kwargs)
            return call
        extract.Runner.load = watched(load, "reader")
        extract.Runner.compute = watched(compute, "compute")
        code = cli.main(["--base", sys.argv[2], "--variant", sys.argv[3], "--out", sys.argv[4], "--device", "cpu"])
        print(json.dumps({"code": code, "default": default, "cpus": len(os.sched_getaffinity(0)), **seen}))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(REPO), str(tmp_path / "base.safetensors"), str(tmp_path / "variant.safetensors"),
         str(tmp_path / "lora.safetensors")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0
    expected = min(seen["default"], max(1, seen["cpus"] - 1))
    assert seen["reader"][0] != seen["compute"][0]  # two threads...
    assert (seen["reader"][1], seen["compute"][1]) == (1, expected)  # ...with the counts chosen
