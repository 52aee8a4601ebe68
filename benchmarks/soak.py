"""Many runs in one process (issue 21): what ten extractions leave behind in a process
that stays up for days, as the WebUI's does, and one run under a hard memory limit.

    python benchmarks/soak.py --base B --variant V [--runs 10] [--cancel-every 3]
    python benchmarks/soak.py --base B --variant V --memory-limit-gb 2.5
    python benchmarks/soak.py --make-zimage-pair DIR ...   # the 4-block Z-Image pair first

Per run, in one process: wall time, peak RSS of that run alone (Linux: VmHWM, reset before
each run by writing 5 to /proc/self/clear_refs), Python threads, OS threads
(/proc/self/task), open file descriptors (and any on the base or variant), and what the
output folder holds. Every ``--cancel-every``-th run is stopped through ``should_stop``
after two layers and must write nothing. ``--leak-control`` keeps every run's loaded
tensors alive on purpose, to show that the per-run peak check does catch a leak.

``--memory-limit-gb`` instead runs one extraction in a child process whose data segment
is capped with ``RLIMIT_DATA`` (torch reserves large virtual areas it never touches, so
``RLIMIT_AS`` fails without a real shortage; RLIMIT_DATA counts private writable memory,
which is what a model pair would fill). Linux only; the probes below (``Probe``) are what
tests/test_soak.py asserts on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROC = Path("/proc/self")


# -- what the process holds -----------------------------------------------------------------
def os_threads() -> int | None:
    """Threads of this process as the OS counts them (native torch/OpenMP threads included)."""
    try:
        return len(os.listdir(PROC / "task"))
    except OSError:
        return None


def settled_os_threads(target: int | None, timeout: float = 1.0) -> int | None:
    """The OS thread count once it is back to ``target`` (or after ``timeout``): a thread
    that Python has joined is still listed for a moment while it exits, and only one
    that stays is left behind."""
    deadline = time.monotonic() + timeout
    count = os_threads()
    while count is not None and target is not None and count > target and time.monotonic() < deadline:
        time.sleep(0.005)
        count = os_threads()
    return count


def open_files() -> list[str] | None:
    """What each open file descriptor points to (Linux), or None elsewhere."""
    try:
        names = os.listdir(PROC / "fd")
    except OSError:
        return None
    targets = []
    for name in names:
        try:
            targets.append(os.readlink(PROC / "fd" / name))
        except OSError:
            pass  # the descriptor listdir itself used, closed by now
    return sorted(targets)


def rss_mb() -> float | None:
    return _status_mb("VmRSS")


def _status_mb(field_name: str) -> float | None:
    try:
        text = (PROC / "status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else None


class PeakRss:
    """The peak RSS of one stretch of work: VmHWM after resetting it to the current RSS
    (``clear_refs`` 5, Linux 4.0+). Where that is not possible, a sampling thread reads
    VmRSS every 2 ms (it can miss a short spike); ``method`` says which was used."""

    def __init__(self):
        self.peak_mb: float | None = None
        self.method = "none"
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        try:
            (PROC / "clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            if rss_mb() is not None:
                self.method = "sampled"
                self.peak_mb = rss_mb()
                self._sampler = threading.Thread(target=self._sample, name="soak-rss-sampler", daemon=True)
                self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            now = rss_mb()
            if now is not None and (self.peak_mb is None or now > self.peak_mb):
                self.peak_mb = now

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            self.peak_mb = _status_mb("VmHWM")
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()


@dataclass
class Probe:
    """What the process holds at one moment."""

    python_threads: list[str]
    os_threads: int | None
    open_files: list[str] | None
    rss_mb: float | None

    @classmethod
    def now(cls) -> Probe:
        names = sorted(thread.name for thread in threading.enumerate())
        return cls(names, os_threads(), open_files(), rss_mb())

    def files_under(self, *paths: Path) -> list[str]:
        """Open descriptors on any of ``paths`` (files, or anything inside folders)."""
        wanted = [str(Path(p).resolve()) for p in paths]
        return [t for t in self.open_files or [] if any(t == w or t.startswith(w + os.sep) for w in wanted)]


# -- many runs ----------------------------------------------------------------------------------
@dataclass
class RunRecord:
    run: int
    cancelled: bool
    seconds: float
    peak_mb: float | None
    python_threads: int
    os_threads: int | None
    open_fds: int | None
    fds_on_inputs: list[str]
    out_entries: list[str]
    wrote: bool


@dataclass
class SoakResult:
    runs: list[RunRecord] = field(default_factory=list)
    before: Probe | None = None
    peak_method: str = ""

    def completed_peaks(self) -> list[tuple[int, float]]:
        return [(r.run, r.peak_mb) for r in self.runs if not r.cancelled and r.peak_mb is not None]

    def peak_growth_mb(self) -> float:
        """The largest peak of a completed run after the second, less the second run's."""
        peaks = self.completed_peaks()
        second = [p for run, p in peaks if run == 2]
        later = [p for run, p in peaks if run > 2]
        return max(later) - second[0] if second and later else 0.0


class StopAfter:
    """should_stop that turns True once ``layers`` layers are done."""

    def __init__(self, layers: int):
        self.layers, self.done = layers, 0

    def progress(self, done: int, total: int, key: str) -> None:
        self.done = done

    def should_stop(self) -> bool:
        return self.done >= self.layers


def soak(base: Path, variant: Path, out_dir: Path, runs: int = 10, cancel_every: int = 3, leak: bool = False,
         options: dict | None = None, log=None) -> SoakResult:  # fmt: skip
    """``runs`` extractions of (base, variant) in this process, each into its own new file in
    ``out_dir``; every ``cancel_every``-th run (3, 6, 9 ...) is stopped after two layers."""
    from lib_ckpt2lora import Cancelled, ExtractOptions, extract

    kept: list = []  # --leak-control only
    restore = None
    if leak:
        import importlib

        import torch

        runner = importlib.import_module("lib_ckpt2lora.extract").Runner
        real_load = runner.load

        def leaking_load(self, unit, bases=None):
            loaded = real_load(self, unit, bases)
            # fp32 copies: the deltas themselves go back to a pool that the next units reuse
            # (sources.SpareDeltas), so holding them would leak nothing; and a delta may come
            # rounded to bf16, half an fp32 input's size, which this control stands for.
            for items in loaded[1]:
                for item in items:
                    tensor = getattr(item, "tensor", item)
                    if torch.is_tensor(tensor):
                        kept.append(tensor.to(torch.float32, copy=True))
            return loaded

        runner.load, restore = leaking_load, (runner, real_load)
    result = SoakResult(before=Probe.now())
    previous_os_threads = result.before.os_threads
    try:
        for run in range(1, runs + 1):
            cancel = cancel_every > 0 and run % cancel_every == 0
            out = out_dir / f"soak_{run:02d}.safetensors"
            stopper = StopAfter(2 if cancel else 10**9)
            started = time.perf_counter()
            with PeakRss() as peak:
                try:
                    extract(
                        ExtractOptions(base=base, variant=variant, out=out, **(options or {})),
                        progress=stopper.progress,
                        should_stop=stopper.should_stop,
                        log=lambda line: None,
                    )
                    cancelled = False
                except Cancelled:
                    cancelled = True
            seconds = time.perf_counter() - started
            after = Probe.now()
            after.os_threads = settled_os_threads(previous_os_threads)
            previous_os_threads = after.os_threads
            result.peak_method = peak.method
            record = RunRecord(
                run=run,
                cancelled=cancelled,
                seconds=seconds,
                peak_mb=peak.peak_mb,
                python_threads=len(after.python_threads),
                os_threads=after.os_threads,
                open_fds=None if after.open_files is None else len(after.open_files),
                fds_on_inputs=after.files_under(base, variant),
                out_entries=sorted(p.name for p in out_dir.iterdir()),
                wrote=out.exists(),
            )
            result.runs.append(record)
            if log is not None:
                log(record)
    finally:
        if restore is not None:
            restore[0].load = restore[1]
        kept.clear()
    return result


# -- one run under a hard memory limit (a child process) ----------------------------------------
def limited_run(base: Path, variant: Path, out: Path, limit_gb: float, kind: str = "DATA", extra: list[str] = ()) -> dict:  # noqa: B006
    """The CLI in a child whose RLIMIT_<kind> (DATA or AS) is ``limit_gb``; its exit code,
    peak RSS and time."""
    code = (
        "import resource, runpy, sys\n"
        f"limit = int({limit_gb} * 2**30)\n"
        f"resource.setrlimit(resource.RLIMIT_{kind}, (limit, limit))\n"
        "sys.argv = ['lib_ckpt2lora', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('lib_ckpt2lora', run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        "    import re\n"
        "    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "    print(f'SOAK_PEAK_KB {hwm}', file=sys.stderr)\n"
    )
    args = ["--base", str(base), "--variant", str(variant), "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    found = re.search(r"SOAK_PEAK_KB (\d+)", proc.stderr)
    return {
        "limit": f"RLIMIT_{kind} {limit_gb} GB",
        "returncode": proc.returncode,
        "seconds": round(seconds, 1),
        "peak_mb": round(int(found.group(1)) / 1024) if found else None,
        "wrote": out.exists(),
        "stderr_tail": proc.stderr.strip().splitlines()[-3:],
    }


# -- the command line -------------------------------------------------------------------------
def _print_table(result: SoakResult) -> None:
    print(f"| run | kind | time | peak RSS ({result.peak_method}) | Python threads | OS threads | open fds | on inputs | wrote |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in result.runs:
        kind = "cancelled" if r.cancelled else "complete"
        peak = f"{r.peak_mb:.0f} MB" if r.peak_mb is not None else "-"
        print(f"| {r.run} | {kind} | {r.seconds:.1f} s | {peak} | {r.python_threads} | {r.os_threads} | {r.open_fds} | "
              f"{len(r.fds_on_inputs)} | {'yes' if r.wrote else 'no'} |")  # fmt: skip
    print(f"before run 1: {len(result.before.python_threads)} Python threads, {result.before.os_threads} OS threads, "
          f"{len(result.before.open_files or [])} fds, {result.before.rss_mb:.0f} MB RSS")  # fmt: skip
    print(f"largest completed-run peak after run 2, less run 2's: {result.peak_growth_mb():+.0f} MB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path)
    p.add_argument("--variant", type=Path)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--cancel-every", type=int, default=3)
    p.add_argument("--leak-control", action="store_true", help="keep every run's loaded tensors: the check must fire")
    p.add_argument("--memory-limit-gb", type=float, default=0.0, help="one CLI run under RLIMIT_DATA instead")
    p.add_argument("--limit-kind", default="DATA", choices=["DATA", "AS"], help="RLIMIT_DATA (default) or RLIMIT_AS")
    p.add_argument("--make-zimage-pair", type=Path, help="write a Z-Image pair here (make_pairs.py) and stop")
    p.add_argument("--blocks", type=int, default=4, help="with --make-zimage-pair: main blocks (default 4)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.make_zimage_pair:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_pairs.py"), "zimage", "--blocks", str(args.blocks),
                        "--out-dir", str(args.make_zimage_pair)], check=True)  # fmt: skip
        return 0
    if args.base is None or args.variant is None:
        p.error("--base and --variant are required")
    with tempfile.TemporaryDirectory(prefix="soak-", dir=args.base.parent) as scratch:
        out_dir = Path(scratch)
        if args.memory_limit_gb:
            figures = limited_run(args.base, args.variant, out_dir / "limited.safetensors", args.memory_limit_gb,
                                  args.limit_kind)  # fmt: skip
            print(json.dumps(figures, indent=1))
        else:
            result = soak(args.base, args.variant, out_dir, args.runs, args.cancel_every, args.leak_control,
                          log=lambda r: print(f"run {r.run}: {r.seconds:.1f} s, peak {r.peak_mb} MB", flush=True))  # fmt: skip
            _print_table(result)
            figures = {"runs": [asdict(r) for r in result.runs], "peak_growth_mb": result.peak_growth_mb()}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
