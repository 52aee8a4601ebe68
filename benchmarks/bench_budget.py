"""Global rank budget against the per-layer rule, at equal file size and along a size curve.

For one (base, variant) pair:

1. the CLI with the default per-layer rule (``--rank-thresh 0.95 --rank-max 64``): its
   file size S0 is the equal-size point;
2. the CLI with ``--target-size S0`` once per ``--budget-objective``;
3. every written LoRA measured from the files (``budget_measure.py``): model-wide
   captured energy, worst layer's relative error, mean layer-output error;
4. the curve, worked out analytically from a report's ``"spectra"`` (``budget_curve.py``):
   the same figures for the global allocation (each objective) and the per-layer rule
   (``--rank-max`` varied, interpolated between the two caps that bracket each size) at
   each of ``--sizes``; at S0 the analytic figures of each written file are printed next
   to the measured ones as a cross-check;
5. a table, ``--json-out`` and, with ``--plot F.png``, a plot (needs matplotlib).

    python benchmarks/bench_budget.py --base B --variant V --work-dir /tmp/budget_runs/x \\
        [--sizes 25MB,50MB] [--spectra-json full_report.json] [--json-out F] [--plot F.png]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

try:
    from . import budget_curve, budget_measure
except ImportError:  # run as a script
    import budget_curve
    import budget_measure

from lib_ckpt2lora.budget import parse_size  # noqa: E402 - budget_curve put the engine on sys.path
from lib_ckpt2lora.options import BUDGET_OBJECTIVES as OBJECTIVES  # noqa: E402

FIGURES = ("energy", "worst_relative_error", "mean_output_error")


def run_cli(base: Path, variant: Path, out: Path, extra: list[str], reuse: bool) -> dict:
    report = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "lib_ckpt2lora", "--base", str(base), "--variant", str(variant), "--out", str(out),
           "--report-json", str(report), "--overwrite", *extra]
    seconds = None
    if not (reuse and out.exists() and report.exists()):
        print("$", shlex.join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=budget_curve._REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"bench_budget: the CLI failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    data = json.loads(report.read_text())
    return {"command": shlex.join(["python", *cmd[1:]]), "seconds": seconds, "file": str(out),
            "bytes": out.stat().st_size, "report": data}


def measure_cached(args, runs: dict) -> dict:
    """budget_measure.measure on every written file; with --reuse, an earlier measurement of
    the same files (same sizes and times) is read back from --work-dir."""
    files = {k: Path(r["file"]) for k, r in runs.items()}
    stamp = {k: [f.stat().st_size, f.stat().st_mtime_ns] for k, f in files.items()}
    cache = args.work_dir / "measured.json"
    if args.reuse and cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp and cached.get("probes") == args.probes and cached.get("seed") == args.seed:
            return cached["measured"]
    measured = budget_measure.measure(args.base, args.variant, files, args.probes, args.seed)
    cache.write_text(json.dumps({"stamp": stamp, "probes": args.probes, "seed": args.seed, "measured": measured}))
    return measured


def triplet_bytes(report: dict) -> int:
    parts, ranks = budget_curve.parts_of(report)
    return sum(r * p.cost for p, r in zip(parts, ranks))


def estimated_overhead(report: dict) -> int:
    """A LoRA file's bytes besides its factors, from a report alone: the header (about
    three entries per module) and the alpha scalars."""
    return 4096 + sum(3 * (len(layer["name"]) + 90) for layer in report.get("layers", []))


def default_sizes(s0: int, factors: str) -> list[int]:
    return [int(float(f) * s0) for f in factors.split(",")]


def equal_size(args, runs: dict, measured: dict) -> list[dict]:
    """Measured and analytic figures of every written file (the cross-check at S0)."""
    rows = []
    for label, run in runs.items():
        parts, ranks = budget_curve.parts_of(run["report"])
        row = {"method": label, "bytes": run["bytes"], **{k: measured[label]["summary"][k] for k in FIGURES},
               "mean_relative_error": measured[label]["summary"]["mean_relative_error"],
               "layers": measured[label]["summary"]["layers"], "problems": measured[label]["problems"]}
        if parts:
            analytic = budget_curve.figures(parts, ranks, run["bytes"] - triplet_bytes(run["report"]))
            row["analytic"] = {k: analytic[k] for k in FIGURES}
            by_key = {x["key"]: x for x in measured[label]["layers"]}
            gaps = [abs(math.sqrt(max(0.0, 1 - budget_curve.kept(p, r) / p.total_energy)) - by_key[p.key]["relative_error"])
                    for p, r in zip(parts, ranks) if p.key in by_key and p.total_energy > 0]
            row["analytic"]["max_layer_relative_error_gap"] = max(gaps) if gaps else None
            row["analytic"]["layers_matched"] = len(gaps)
        rows.append(row)
    return rows


def allocation_agreement(reference: dict, runs: dict) -> dict:
    """Per budget run: how many parts the engine ranked differently from budget.allocate
    on the per-layer run's spectra at the same byte budget (randomized values differ a
    little from run to run, so a few ties may flip)."""
    parts, _ = budget_curve.parts_of(reference)
    out = {}
    for label, run in runs.items():
        if not label.startswith("global"):
            continue
        run_parts, run_ranks = budget_curve.parts_of(run["report"])
        budget = triplet_bytes(run["report"])
        ranks = budget_curve.global_ranks(parts, label.split()[-1], budget)
        mine = dict(zip((p.key for p in parts), ranks or []))
        differ = [p.key for p, r in zip(run_parts, run_ranks) if mine.get(p.key) != r]
        out[label] = {"parts": len(run_parts), "differ": len(differ), "examples": differ[:5]}
    return out


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = " ".join(f"{title:>12}" if i else f"{title:<22}" for i, (title, _, _) in enumerate(columns))
    lines = [head]
    for row in rows:
        cells = []
        for i, (_, key, fmt) in enumerate(columns):
            value = row
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                text = "-"
            elif fmt == "MB":
                text = f"{value / 1e6:.2f}"
            else:
                text = format(value, fmt) if fmt else str(value)
            cells.append(f"{text:<22}" if i == 0 else f"{text:>12}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot(path: Path, pairs: list[tuple[str, list[dict], int | None]]) -> None:
    """One row per pair (title, curve, S0): mean layer-output error and model-wide energy
    against file size, one line per method; S0 dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, grid = plt.subplots(len(pairs), 2, figsize=(10, 3.6 * len(pairs)), squeeze=False)
    for axes, (title, curve, s0) in zip(grid, pairs):
        for method in dict.fromkeys(row["method"] for row in curve):
            points = [(row["bytes"] / 1e6, row) for row in curve if row["method"] == method and row.get("bytes")]
            style = "k--o" if method == "per-layer" else "-o"
            for ax, key in zip(axes, ("mean_output_error", "energy")):
                ax.plot([x for x, _ in points], [r[key] for _, r in points], style, label=method, markersize=4)
        for ax, label in zip(axes, ("mean layer-output error (lower is better)", "model-wide captured energy")):
            ax.set_xlabel("file size (MB)")
            ax.set_ylabel(label, fontsize=9)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(sorted({round(row["size"] / 1e6, 1) for row in curve}))
            ax.grid(True, alpha=0.3)
            ax.set_title(title, fontsize=9)
            if s0:
                ax.axvline(s0 / 1e6, color="grey", lw=0.8, ls=":")
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path)
    ap.add_argument("--variant", type=Path)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/ckpt2lora_budget"))
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--sizes", help="curve sizes, e.g. 25MB,50MB,100MB,200MB (default: --size-factors times S0)")
    ap.add_argument("--size-factors", default="0.25,0.5,1,2")
    ap.add_argument("--rank-thresh", type=float, default=0.95, help="the per-layer rule's threshold on the curve")
    ap.add_argument("--engine-args", default="", help="extra CLI flags for every run")
    ap.add_argument("--budget-args", default="", help="extra CLI flags for the --target-size runs only")
    ap.add_argument("--spectra-json", type=Path, help="a report JSON from elsewhere for the curve")
    ap.add_argument("--curve-rank-max", type=int, default=0,
                    help="one more per-layer run with this --rank-max, whose longer spectra drive the curve "
                         "(sizes above the default cap's all-at-cap size need it)")
    ap.add_argument("--overhead-bytes", type=int, help="file bytes besides the factors (curve of --spectra-json)")
    ap.add_argument("--probes", type=int, default=64, help="Gaussian inputs per layer for the output error")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="keep outputs of an earlier run in --work-dir")
    ap.add_argument("--label", default="", help="the pair's name in the table and the plot")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--plot-from", help="comma-separated --json-out files: plot their curves together in --plot, "
                                        "one row each, and stop")
    args = ap.parse_args(argv)
    objectives = [o for o in args.objectives.split(",") if o]
    if args.plot_from and args.plot:
        saved = [json.loads(Path(f).read_text()) for f in args.plot_from.split(",")]
        plot(args.plot, [(x.get("label", ""), x["curve"], (x.get("runs", {}).get("per-layer") or {}).get("bytes"))
                         for x in saved])
        print(f"plot: {args.plot}")
        return 0
    if not (args.base and args.variant) and not (args.spectra_json and args.sizes):
        ap.error("give --base and --variant, or --spectra-json with --sizes (the curve alone)")
    result: dict = {"label": args.label, "objectives": objectives}
    runs: dict = {}
    s0 = None
    if args.base and args.variant:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        extra = shlex.split(args.engine_args)
        runs["per-layer"] = run_cli(args.base, args.variant, args.work_dir / "per_layer.safetensors", extra, args.reuse)
        s0 = runs["per-layer"]["bytes"]
        if budget_curve.has_spectra(runs["per-layer"]["report"]):
            for objective in objectives:
                runs[f"global {objective}"] = run_cli(
                    args.base, args.variant, args.work_dir / f"global_{objective}.safetensors",
                    [*extra, "--target-size", str(s0), "--budget-objective", objective, *shlex.split(args.budget_args)],
                    args.reuse)
        else:
            print("bench_budget: the report has no \"spectra\" (engine without the budget runner): per-layer only")
        t0 = time.perf_counter()
        measured = measure_cached(args, runs)
        result["measure_seconds"] = time.perf_counter() - t0
        result["equal_size"] = equal_size(args, runs, measured)
        result["allocation_agreement"] = allocation_agreement(runs["per-layer"]["report"], runs)
        result["runs"] = {k: {x: r[x] for x in ("command", "seconds", "file", "bytes")} | {"budget": r["report"].get("budget")}
                          for k, r in runs.items()}
        result["measured_layers"] = {k: m["layers"] for k, m in measured.items()}
        print(f"\nEqual size (S0 = {s0} bytes, the per-layer rule's file); measured from the files, "
              f"analytic (a:) from each file's report spectra:")
        print(format_table(result["equal_size"], [
            ("method", "method", ""), ("MB", "bytes", "MB"), ("energy", "energy", ".4f"),
            ("worst rel", "worst_relative_error", ".4f"), ("mean out", "mean_output_error", ".4f"),
            ("mean rel", "mean_relative_error", ".4f"), ("a: energy", "analytic.energy", ".4f"),
            ("a: worst", "analytic.worst_relative_error", ".4f"), ("a: mean out", "analytic.mean_output_error", ".4f"),
            ("max gap", "analytic.max_layer_relative_error_gap", ".1e")]))
        for row in result["equal_size"]:
            if row["problems"]:
                print(f"  {row['method']}: {len(row['problems'])} problems, e.g. {row['problems'][:3]}")
        for label, agreement in result["allocation_agreement"].items():
            print(f"  {label}: engine ranks vs budget.allocate on the per-layer run's spectra: "
                  f"{agreement['differ']} of {agreement['parts']} parts differ {agreement['examples'][:2]}")
        if args.curve_rank_max:
            runs["per-layer (curve)"] = run_cli(
                args.base, args.variant, args.work_dir / f"per_layer_cap{args.curve_rank_max}.safetensors",
                [*extra, "--rank-max", str(args.curve_rank_max)], args.reuse)
            result["runs"]["per-layer (curve)"] = {x: runs["per-layer (curve)"][x] for x in ("command", "seconds", "bytes")}
    # The curve: from --spectra-json, else from the run whose spectra reach furthest.
    source, overhead = None, args.overhead_bytes
    if args.spectra_json:
        source = json.loads(args.spectra_json.read_text())
        overhead = overhead if overhead is not None else estimated_overhead(source)
        result["curve_source"] = str(args.spectra_json)
    elif runs:
        label = max(runs, key=lambda k: max((len(p.values) for p in budget_curve.parts_of(runs[k]["report"])[0]),
                                             default=0))
        source = runs[label]["report"]
        overhead = overhead if overhead is not None else runs[label]["bytes"] - triplet_bytes(source)
        result["curve_source"] = label
    if source is not None and budget_curve.has_spectra(source):
        parts, _ = budget_curve.parts_of(source)
        sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else default_sizes(s0, args.size_factors)
        curve = budget_curve.curve(parts, sizes, objectives, args.rank_thresh, overhead)
        result["curve"] = curve
        result["curve_overhead_bytes"] = overhead
        print(f"\nCurve (analytic from {result['curve_source']}'s spectra, {len(parts)} parts, overhead {overhead} bytes; "
              f"per-layer rule: --rank-thresh {args.rank_thresh}, --rank-max interpolated):")
        print(format_table(curve, [
            ("method", "method", ""), ("size MB", "size", "MB"), ("file MB", "bytes", "MB"), ("energy", "energy", ".4f"),
            ("worst rel", "worst_relative_error", ".4f"), ("mean out", "mean_output_error", ".4f"),
            ("rank-max", "rank_max", "")]))
        if args.plot:
            plot(args.plot, [(args.label or "global rank budget vs per-layer rule", curve, s0)])
            print(f"plot: {args.plot}")
    elif source is not None:
        print("bench_budget: no \"spectra\" in the curve's report: no curve")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
        print(f"json: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
