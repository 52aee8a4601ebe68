"""Benchmark: one batch run of N variants vs N single runs against the same base.

    python benchmarks/bench_batch.py --arch sd15                 # generate base + 3 variants, run both
    python benchmarks/bench_batch.py --arch zimage --blocks 1 --variants 3

Pairs come from make_pairs.py (real key names and shapes, realistic deltas): its pair
gives the base and the first variant; each further variant is the same base plus that
delta with its rows rolled and its sign flipped (make_more_variants: the same spectra,
other row spaces), so all variants derive from one base.

Each configuration runs in a fresh subprocess (per-run peak memory and CPU seconds), in
turn: (s) the N single CLI runs one after another, (b) one batch CLI run
``--variant V1 .. VN --out DIR/``. Reported side by side: wall seconds, CPU seconds
(user + system: the machine may be shared, CPU time is the steadier figure), bytes the
process read during the extraction (``rchar`` from /proc/self/io around the CLI call:
Linux only) and the peak anonymous memory (RssAnon, polled; not ru_maxrss, which Linux
carries over from this parent process across exec). Then (untimed) the batch outputs are compared with the single
runs' tensor by tensor. The files are read once first, so every run starts from the
same warm page cache; ``uptime`` is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_extract import machine_description, run_measured, warm_cache  # noqa: E402
from make_pairs import generate_pair  # noqa: E402


def make_more_variants(base: Path, first: Path, count: int, out_dir: Path) -> list[Path]:
    """``count`` more variants of ``base`` from the first one's delta D, cheaply (generating
    a fresh realistic delta per tensor costs minutes on a busy machine): variant s is
    base + (-1)^s * D with D's rows rolled by s. Same spectra and noise as D (the rank rule
    behaves as on D), other row spaces, stored in the base's dtype."""
    import torch
    from safetensors import safe_open
    from stio import StreamingSafetensorsWriter

    paths = []
    for shift in range(1, count + 1):
        path = out_dir / f"{first.stem}_s{shift}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        t0 = time.perf_counter()
        with safe_open(str(base), "pt") as bases, safe_open(str(first), "pt") as variants:
            keys = sorted(bases.keys())
            layout = []
            for key in keys:
                piece = bases.get_slice(key)
                layout.append((key, tuple(piece.get_shape()), bases.get_tensor(key).dtype))
            writer = StreamingSafetensorsWriter(path, layout, {"format": "pt"})
            try:
                for key in keys:
                    weight = bases.get_tensor(key)
                    if not weight.is_floating_point():
                        writer.write(key, weight)
                        continue
                    delta = variants.get_tensor(key).float() - weight.float()
                    delta = torch.roll(delta, shift, dims=0) * (-1) ** shift
                    writer.write(key, (weight.float() + delta).to(weight.dtype))
                writer.close()
            except BaseException:
                writer.abort()
                raise
        print(f"variant {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


def child(argv: list[str]) -> int:
    """Run the CLI in this process and record the bytes it read (rchar) around the call."""
    record, cli_args = Path(argv[0]), argv[1:]
    sys.path.insert(0, str(REPO))
    from lib_ckpt2lora.cli import main

    before = _rchar()
    code = main(cli_args)
    record.write_text(json.dumps({"read_bytes": _rchar() - before, "rc": code}))
    return code


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def measured_cli(cli_args: list[str], work: Path, tag: str) -> dict:
    record = work / f"{tag}.io.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(record), *cli_args]
    result = run_measured(command, work / f"{tag}.log")
    if result["rc"] != 0:
        raise SystemExit(f"{tag} failed (exit {result['rc']}); see {result['log']}")
    result.update(json.loads(record.read_text()))
    return result


def identical(first: Path, second: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(first)), load_file(str(second))
    return set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("zimage", "sd15"), default="sd15")
    ap.add_argument("--blocks", type=int, default=1, help="Z-Image main blocks (default 1)")
    ap.add_argument("--variants", type=int, default=3)
    ap.add_argument("--pairs-dir", type=Path, default=Path("/tmp/ckpt2lora_pairs"))
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/ckpt2lora_bench_batch"))
    ap.add_argument("--engine-args", default="", help="extra arguments for every CLI run, e.g. '--rank 32'")
    args = ap.parse_args(argv)

    base, first = generate_pair(args.arch, args.pairs_dir, blocks=args.blocks, log=lambda line: print(line, flush=True))
    variants = [first, *make_more_variants(base, first, args.variants - 1, args.pairs_dir)]
    work = args.work_dir
    singles, batch_dir = work / "single", work / "batch"
    for folder in (singles, batch_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.safetensors"):
            old.unlink()
    extra = args.engine_args.split()
    print(f"machine: {machine_description('cpu')}")
    print(f"base {base.name} ({base.stat().st_size / 2**30:.2f} GiB), {len(variants)} variants of the same size")
    print(f"warm page cache: {warm_cache([base, *variants]):.1f} s")
    print(f"uptime before: {uptime()}", flush=True)

    single_runs = []
    for variant in variants:
        cli = ["--base", str(base), "--variant", str(variant), "--out", str(singles / variant.name), *extra]
        single_runs.append(measured_cli(cli, work, f"single_{variant.stem}"))
        print(f"  single {variant.name}: {single_runs[-1]['wall_s']:.1f} s wall", flush=True)
    cli = ["--base", str(base), "--variant", *map(str, variants), "--out", str(batch_dir), *extra]
    batch = measured_cli(cli, work, "batch")
    print(f"uptime after: {uptime()}")

    total = {key: sum(run[key] for run in single_runs) for key in ("wall_s", "cpu_s", "read_bytes")}
    # RssAnon polled in the child: its ru_maxrss starts at this parent's size (kept across exec).
    peak = max(run["peak_anon_mb"] for run in single_runs)
    print(f"\n{'':28}{'wall s':>9}{'CPU s':>9}{'read GiB':>10}{'peak anon MB':>14}")
    print(
        f"{f'{len(variants)} single runs (sum)':28}{total['wall_s']:9.1f}{total['cpu_s']:9.1f}"
        f"{total['read_bytes'] / 2**30:10.2f}{peak:14.0f}"
    )
    print(
        f"{f'batch of {len(variants)}':28}{batch['wall_s']:9.1f}{batch['cpu_s']:9.1f}"
        f"{batch['read_bytes'] / 2**30:10.2f}{batch['peak_anon_mb']:14.0f}"
    )
    print(
        f"batch / singles: wall {batch['wall_s'] / total['wall_s']:.2f}x, CPU {batch['cpu_s'] / total['cpu_s']:.2f}x, "
        f"bytes read {batch['read_bytes'] / total['read_bytes']:.2f}x"
    )
    same = [identical(singles / v.name, batch_dir / v.name) for v in variants]
    print(f"batch outputs identical to the single runs' (every tensor): {sum(same)} of {len(same)}")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
