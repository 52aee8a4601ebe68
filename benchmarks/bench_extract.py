"""Benchmark: our CLI vs the peers' algorithm vs the I/O floor, on realistic full-size pairs.

Runs, each in a fresh subprocess (so peak RSS is per run), alternating their order over
``--repeats``:

  (a) ours   ``python -m lib_ckpt2lora --base B --variant V --out O --report-json J``
             (default settings: auto rank, --rank-thresh 0.95, --rank-max 64, --min-dim 32)
  (b) peer   ``benchmarks/peer_full_svd.py``: both state dicts loaded, full SVD per weight,
             truncated to the ranks (a) chose
  (c) floor  ``benchmarks/io_floor.py``: read every tensor pair of both files and subtract

It prints wall time and peak RSS per run, the medians and the ratios, then (untimed) the
per-layer captured energy of our LoRA against the optimal one of the same rank
(``benchmarks/evaluate.py``). Both files are read once before the runs so that every run
starts from the same warm page cache.

    python benchmarks/bench_extract.py --arch zimage --blocks 1            # generate + run
    python benchmarks/bench_extract.py --base B --variant V --runs a,c     # existing pair
    python benchmarks/bench_extract.py --arch zimage --blocks 30 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAMES = {"a": "(a) ours", "b": "(b) peer full SVD", "c": "(c) I/O floor", "p": "(p) peer svd_lowrank"}


# --------------------------------------------------------------------- measuring


def _proc_status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict:
    """Run `cmd`; return wall seconds, peak RSS (ru_maxrss of that child) and the peak of
    its anonymous memory (RssAnon, polled), plus its exit code."""
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        peak_anon = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                kb = _proc_status_kb(proc.pid).get("RssAnon", 0)
                peak_anon[0] = max(peak_anon[0], kb)
                done.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": peak_anon[0] / 1024,
            "rc": proc.returncode, "log": str(log_path)}


def warm_cache(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


# ----------------------------------------------------------------------- machine


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = ""
    try:
        with open("/proc/meminfo") as f:
            ram = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, {ram}"
    if device.startswith("cuda"):
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            text += f"; GPU {gpu}"
        except (OSError, subprocess.SubprocessError):
            text += "; GPU (nvidia-smi unavailable)"
    return text


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# -------------------------------------------------------------------------- runs


def commands(args, base: Path, variant: Path, work: Path, tag: str) -> dict[str, tuple[list[str], Path | None]]:
    py = sys.executable
    dev = [] if args.device is None else ["--device", args.device]
    ours_out = work / f"ours_{tag}.safetensors"
    report = work / f"ours_{tag}.json"
    a = [py, "-m", "lib_ckpt2lora", "--base", str(base), "--variant", str(variant), "--out", str(ours_out),
         "--report-json", str(report), *dev, *shlex.split(args.engine_args)]
    b = [py, str(HERE / "peer_full_svd.py"), "--base", str(base), "--variant", str(variant),
         "--out", str(work / f"peer_{tag}.safetensors"), "--spectra", str(work / f"peer_{tag}_spectra.pt"),
         "--device", args.device or "cpu", "--max-seconds", str(args.peer_max_seconds)]
    c = [py, str(HERE / "io_floor.py"), "--base", str(base), "--variant", str(variant), "--device", args.device or "cpu"]
    p = [py, str(HERE / "peer_lowrank.py"), "--base", str(base), "--variant", str(variant),
         "--out", str(work / f"lowrank_{tag}.safetensors")]
    return {"a": (a, ours_out), "b": (b, work / f"peer_{tag}.safetensors"), "c": (c, None),
            "p": (p, work / f"lowrank_{tag}.safetensors")}


def raw_rank_file(report_path: Path, base: Path, out: Path) -> Path | None:
    """Translate our report's per-layer ranks into ranks per raw checkpoint tensor."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    import keymap
    from stio import read_header

    infos, _ = read_header(base)
    shapes = {k: i.shape for k, i in infos.items()}
    report = json.loads(report_path.read_text())
    units = keymap.canonical_units(base, shapes)
    ranks = keymap.raw_ranks(report, units, shapes)
    if not ranks:
        return None
    out.write_text(json.dumps({"layers": [{"key": k, "rank": r} for k, r in ranks.items()]}))
    return out


def peer_estimate(res: dict) -> None:
    """Read the peer's own timing line; when it stopped early, replace its wall time by the
    extrapolated one (measured wall - peer's measured total + peer's estimated total)."""
    info = None
    for line in Path(res["log"]).read_text().splitlines():
        if line.startswith("peer: {"):
            info = json.loads(line[len("peer: "):])
    if info is None:
        return
    res["peer"] = info
    if not info.get("complete", True):
        res["estimated"] = True
        res["wall_s_measured"] = res["wall_s"]
        res["wall_s"] = res["wall_s"] - info["total_s"] + info["estimated_total_s"]


def fmt_ratio(x: float) -> str:
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("pair (generate one, or give both files)")
    src.add_argument("--arch", choices=("zimage", "sd15", "wan", "wan5b"))
    src.add_argument("--blocks", type=int, default=1, help="Z-Image main blocks (default 1; the real model has 30)")
    src.add_argument("--pairs-dir", type=Path, default=Path("/tmp/ckpt2lora_pairs"))
    src.add_argument("--gen-device", default=None, help="where to generate values (default: --device or cpu)")
    src.add_argument("--base", type=Path)
    src.add_argument("--variant", type=Path)
    ap.add_argument("--runs", default="a,b,c", help="which runs, comma-separated (default a,b,c)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; the order rotates each round")
    ap.add_argument("--device", default=None, help="cpu or cuda for every run (default: each tool's own default)")
    ap.add_argument("--engine-args", default="", help="extra arguments for our CLI, e.g. '--svd exact'")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/ckpt2lora_bench"))
    ap.add_argument("--no-eval", action="store_true", help="skip the per-layer energy comparison")
    ap.add_argument("--no-warm", action="store_true", help="do not pre-read the files into the page cache")
    ap.add_argument("--force-peer", action="store_true", help="run (b) even when both models do not fit in RAM")
    ap.add_argument("--peer-max-seconds", type=float, default=0,
                    help="let (b) factor for this long only and extrapolate its time from the share of the "
                         "work done (marked 'est.'); 0 = run it to the end")
    ap.add_argument("--eval-max-seconds", type=float, default=0,
                    help="stop the energy comparison after this long (0 = every layer)")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS for every run (torch's intra-op threads; 0: torch's default)")
    ap.add_argument("--json-out", type=Path, help="write every figure here as JSON")
    args = ap.parse_args(argv)

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.base and args.variant:
        base, variant = args.base, args.variant
    elif args.arch:
        gen = [sys.executable, str(HERE / "make_pairs.py"), args.arch, "--blocks", str(args.blocks),
               "--out-dir", str(args.pairs_dir), "--device", args.gen_device or args.device or "cpu"]
        print("$ " + shlex.join(gen), flush=True)
        t0 = time.perf_counter()
        lines = subprocess.run(gen, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        base, variant = Path(lines[-2]), Path(lines[-1])
        print(f"pair ready in {time.perf_counter() - t0:.1f} s: {base.name}, {variant.name}", flush=True)
    else:
        ap.error("give --arch (to generate a pair) or both --base and --variant")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if any(r not in NAMES for r in runs):
        ap.error("--runs takes a comma-separated subset of a,b,c,p")

    size = base.stat().st_size + variant.stat().st_size
    machine = machine_description(args.device or "cpu")
    print(f"machine: {machine}")
    print(f"pair: {base} + {variant} ({size / 2**30:.2f} GiB together)")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if "b" in runs and not args.force_peer and size * 1.15 + (1 << 30) > available_ram_bytes():
        print("(b) skipped: the peer loads both models whole and they do not fit in the available RAM "
              "(--force-peer to try anyway)")
        runs.remove("b")
    if not args.no_warm:
        print(f"page cache warmed in {warm_cache([base, variant]):.1f} s", flush=True)

    results: dict[str, list[dict]] = {r: [] for r in runs}
    report_path: Path | None = None
    ranks_path: Path | None = None
    ours_lora: Path | None = None
    peer_spectra: Path | None = None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"torch intra-op threads: {args.threads or 'default'}")
    print(f"\n{'run':<20} {'round':>5} {'wall s':>9} {'CPU s':>9} {'peak RSS MB':>12} {'peak anon MB':>13}",
          flush=True)
    for rnd in range(args.repeats):
        order = runs[rnd % len(runs):] + runs[:rnd % len(runs)]
        if rnd == 0 and "a" in order:  # (b) takes its ranks from (a): (a) goes first in round 0
            order.remove("a")
            order.insert(0, "a")
        for r in order:
            cmd, out = commands(args, base, variant, work, f"{r}{rnd}")[r]
            if r == "b" and ranks_path is not None:
                cmd += ["--ranks-from", str(ranks_path)]
            if out is not None:
                out.unlink(missing_ok=True)
            res = run_measured(cmd, work / f"log_{r}{rnd}.txt", env)
            res["load_1min"] = os.getloadavg()[0]  # the machine is shared: every figure with its load
            if r == "b" and res["rc"] == 0:
                peer_estimate(res)
            results[r].append(res)
            note = "" if res["rc"] == 0 else f"  FAILED rc={res['rc']}, see {res['log']}"
            if res.get("estimated"):
                note += (f"  (est.: stopped after {res['wall_s_measured']:.0f} s having factored "
                         f"{res['peer']['layers']}/{res['peer']['layers_planned']} layers)")
            print(f"{NAMES[r]:<20} {rnd + 1:>5} {res['wall_s']:>9.1f} {res['cpu_s']:>9.1f} {res['peak_rss_mb']:>12.0f} "
                  f"{res['peak_anon_mb']:>13.0f}  load {res['load_1min']:.1f}{note}", flush=True)
            if res["rc"] != 0:
                continue
            if r == "a":
                ours_lora, report_path = out, work / f"ours_a{rnd}.json"
                if ranks_path is None:
                    ranks_path = raw_rank_file(report_path, base, work / "ranks_for_peer.json")
            elif r == "b":
                peer_spectra = work / f"peer_b{rnd}_spectra.pt"
            if out is not None and r in "bp":
                out.unlink(missing_ok=True)  # the peer's own LoRA is not needed afterwards

    ok = {r: [x for x in v if x["rc"] == 0] for r, v in results.items()}
    med = {r: statistics.median(x["wall_s"] for x in v) for r, v in ok.items() if v}
    cpu = {r: statistics.median(x["cpu_s"] for x in v) for r, v in ok.items() if v and not any(
        x.get("estimated") for x in v)}
    rss = {r: max(x["peak_rss_mb"] for x in v) for r, v in results.items() if v}
    estimated = any(x.get("estimated") for x in results.get("b", []))
    print(f"\nload average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(wall times are only comparable on an otherwise idle machine; CPU times are less sensitive)")
    print(f"{'method':<20} {'median wall s':>13} {'median CPU s':>13} {'max peak RSS MB':>16}   ratios (wall; CPU)"
          + ("   ((b) extrapolated, see above)" if estimated else ""))
    for r in runs:
        if r not in med:
            print(f"{NAMES[r]:<20} {'failed':>13}")
            continue
        ratios = []
        for peer in "bp":
            if r not in (peer, "c") and peer in med:
                extra = f"; {fmt_ratio(cpu[peer] / cpu[r])}" if peer in cpu and r in cpu and cpu[r] > 0 else ""
                ratios.append(f"{fmt_ratio(med[peer] / med[r])}{extra} faster than ({peer})")
        if r != "c" and "c" in med:
            extra = f"; {fmt_ratio(cpu[r] / cpu['c'])}" if "c" in cpu and r in cpu and cpu["c"] > 0 else ""
            ratios.append(f"{fmt_ratio(med[r] / med['c'])}{extra} the I/O floor")
        cpu_text = f"{cpu[r]:.1f}" if r in cpu else "-"
        print(f"{NAMES[r]:<20} {med[r]:>13.1f} {cpu_text:>13} {rss[r]:>16.0f}   {', '.join(ratios)}")

    peer_energy = None
    if not args.no_eval and "p" in runs:
        # Untimed: the peer's per-layer energy against the optimum, and the exact spectra
        # (fp32 svdvals per checkpoint tensor) that the evaluation of (a) then reuses.
        energy_json, spectra = work / "lowrank_energy.json", work / "lowrank_spectra.pt"
        cmd = commands(args, base, variant, work, "eval")["p"][0] + ["--energy-json", str(energy_json),
                                                                     "--spectra", str(spectra)]
        print("\nmeasuring the peer's per-layer energy (untimed) ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        print(proc.stdout.rstrip() or proc.stderr.rstrip()[-3000:])
        if proc.returncode == 0:
            peer_energy = json.loads(energy_json.read_text())
            peer_energy.pop("all", None)
            if peer_spectra is None:
                peer_spectra = spectra
        (work / "lowrank_eval.safetensors").unlink(missing_ok=True)

    evaluation = None
    if not args.no_eval and ours_lora is not None and ours_lora.exists():
        eval_json = work / "evaluation.json"
        cmd = [sys.executable, str(HERE / "evaluate.py"), "--base", str(base), "--variant", str(variant),
               "--lora", str(ours_lora), "--json-out", str(eval_json), "--device", args.device or "cpu",
               "--max-seconds", str(args.eval_max_seconds)]
        if report_path is not None:
            cmd += ["--report", str(report_path)]
        if peer_spectra is not None and peer_spectra.exists():
            cmd += ["--spectra", str(peer_spectra)]
        print(f"\nevaluating per-layer energy (untimed){'' if peer_spectra else '; computing exact spectra'} ...",
              flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        print(proc.stdout.rstrip() or proc.stderr.rstrip()[-3000:])
        print(f"(evaluation took {time.perf_counter() - t0:.1f} s)")
        if proc.returncode == 0 and eval_json.exists():
            evaluation = json.loads(eval_json.read_text())

    if args.json_out:
        args.json_out.write_text(json.dumps({
            "machine": machine, "base": str(base), "variant": str(variant), "pair_gib": size / 2**30,
            "device": args.device, "runs": results, "median_s": med, "median_cpu_s": cpu, "max_peak_rss_mb": rss,
            "evaluation_summary": evaluation and evaluation["summary"], "peer_lowrank_energy": peer_energy,
            "threads": args.threads,
        }, indent=1))
    failed = any(x["rc"] != 0 for v in results.values() for x in v)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
