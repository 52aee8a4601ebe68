"""Many runs, one process (issue 21): the WebUI's process stays up for days and runs our
extractions between its own images, so ten extractions of a full-width bf16 pair, some
cancelled through ``should_stop``, must leave the process as they found it: no thread
(Python or OS) left, no file descriptor open (none on the base or variant: Windows
cannot delete or replace a file a process holds), no temporary file, nothing written by
a cancelled run, and no per-run growth of the peak memory. The probes are the soak
benchmark's (benchmarks/soak.py), which measures the same on bigger pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import realistic as rl
from _bad_inputs import cli_env, one_torch_thread

from benchmarks.soak import PeakRss, Probe, soak

LINUX = sys.platform.startswith("linux")
# Full-width layers (the randomized SVD path), about 8 MB per file in bf16.
SHAPES = {
    "blocks.0.attn.weight": (1024, 1024),
    "blocks.0.mlp.weight": (1536, 1024),
    "blocks.0.out.weight": (1024, 1536),
    "blocks.1.attn.weight": (1024, 1024),
    "blocks.1.proj.weight": (1024, 1280),
}
# One run's widened fp32 inputs are ~54 MB; a leak of even a quarter of that per run
# over the seven later complete runs passes this. Run-to-run noise measured ~1-3 MB.
PEAK_GROWTH_LIMIT_MB = 40


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("soak_pair")
    base = rl.base_weights(SHAPES, seed=0)
    deltas = {key: rl.noisy_delta(*tensor.shape, seed=i + 1) for i, (key, tensor) in enumerate(base.items())}
    variant = rl.apply_delta(base, deltas)
    return rl.save(base, folder / "base.safetensors"), rl.save(variant, folder / "variant.safetensors")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def test_ten_runs_leave_the_process_as_they_found_it(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inputs_folder = pair[0].parent
    inputs_before = sorted(p.name for p in inputs_folder.iterdir())
    before = Probe.now()
    result = soak(pair[0], pair[1], out, runs=10, cancel_every=3)
    after = Probe.now()
    runs = result.runs
    assert [r.cancelled for r in runs] == [r.run % 3 == 0 for r in runs]

    # Nothing written by a cancelled run, no temporary file anywhere near the run.
    written = {f"soak_{r.run:02d}.safetensors" for r in runs if not r.cancelled}
    assert all(r.wrote != r.cancelled for r in runs)
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    assert sorted(p.name for p in inputs_folder.iterdir()) == inputs_before

    # Threads: the Python ones exactly as before; the OS ones (torch starts its pools on
    # first use) as after the first run, whatever happened since.
    assert after.python_threads == before.python_threads
    assert all(r.python_threads == len(before.python_threads) for r in runs)
    if LINUX:
        assert {r.os_threads for r in runs[1:]} == {runs[0].os_threads}, [r.os_threads for r in runs]
        # File descriptors: none on the base or variant after any run, none gained overall.
        assert all(r.fds_on_inputs == [] for r in runs), [r.fds_on_inputs for r in runs]
        assert after.files_under(out) == []
        assert {r.open_fds for r in runs} == {len(before.open_files)}, [r.open_fds for r in runs]

        # Memory: every complete run after the second peaks within the limit of the second.
        assert result.peak_method == "VmHWM"
        peaks = result.completed_peaks()
        assert len(peaks) == 7 and result.peak_growth_mb() < PEAK_GROWTH_LIMIT_MB, peaks


@pytest.mark.skipif(not LINUX, reason="per-run peak RSS is read from /proc")
def test_the_peak_check_catches_a_per_run_leak(pair, tmp_path):
    """The control: keeping each run's loaded tensors (what a reader thread left running,
    or a cache, would do) must make the peak grow past the limit within four runs."""
    out = tmp_path / "out"
    out.mkdir()
    result = soak(pair[0], pair[1], out, runs=4, cancel_every=0, leak=True)
    assert result.peak_growth_mb() > PEAK_GROWTH_LIMIT_MB, result.completed_peaks()


@pytest.mark.skipif(not LINUX, reason="VmHWM is read from /proc")
def test_peak_rss_is_per_run():
    """PeakRss measures its own stretch: a big allocation before it does not count."""
    big = bytearray(200 * 2**20)
    big[:: 4096] = b"x" * len(big[:: 4096])
    del big
    with PeakRss() as quiet:
        pass
    with PeakRss() as busy:
        big = bytearray(100 * 2**20)
        big[:: 4096] = b"x" * len(big[:: 4096])
        del big
    assert quiet.method == busy.method == "VmHWM"
    assert busy.peak_mb - quiet.peak_mb > 90
    assert quiet.peak_mb < busy.peak_mb


@pytest.mark.skipif(not LINUX, reason="RLIMIT_DATA and VmHWM are Linux's")
def test_cli_completes_under_a_hard_memory_limit(pair, tmp_path, monkeypatch):
    """The CLI in a child under RLIMIT_DATA (torch's large untouched virtual reservations
    make RLIMIT_AS a poor measure of use). The full-size case (the 4-block Z-Image pair,
    2 x 2.7 GB, under 2.5 GB) is benchmarks/soak.py's, in the README; here the small pair
    under 1 GB, and a control that the limit binds a large allocation (the kind torch's CPU
    allocator makes, mmap'd memory; checked by hand for torch.empty too)."""
    import subprocess

    from benchmarks.soak import ROOT, limited_run

    for name, value in cli_env().items():  # one compute thread, no GPU: as the other CLI tests
        monkeypatch.setenv(name, value)
    out = tmp_path / "limited.safetensors"
    figures = limited_run(pair[0], pair[1], out, 1.0, "DATA", ["--svd", "randomized"])
    assert figures["returncode"] == 0 and figures["wrote"], figures
    assert figures["peak_mb"] < 1024, figures
    control = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (2**30, 2**30))\n"
        "try:\n"
        "    bytearray(2**30)\n"
        "except MemoryError:\n"
        "    print('refused')\n"
    )
    refused = subprocess.run([sys.executable, "-c", control], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert refused.stdout.strip() == "refused", refused.stderr[-500:]
