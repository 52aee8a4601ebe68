"""The command line: the original script's flags, same names, same meanings."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from .budget import format_size
from .constants import KNOWN_FAMILIES, VERSION
from .errors import Cancelled, SignalFlag, UserError
from .options import BUDGET_OBJECTIVES, FORMATS, SAVE_DTYPES, SVD_MODES, ExtractOptions, expert_pair

DESCRIPTION = (
    "Extract the weight delta between a base model and one or two variant checkpoints (or LoRA "
    "files) and save the result as a LoRA or a merged checkpoint.\n"
    "Single variant: converts (variant - base) directly to LoRA via truncated SVD.\n"
    "Two variants: extracts the component common to both variants (--variant2), or a weighted "
    "union of their unique components (--union)."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_program_name(), description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", help="Base model safetensors path (required unless --merge)")
    p.add_argument(
        "--variant",
        nargs="+",
        help="Variant model safetensors or LoRA path (required unless --merge); several (batch): one LoRA each, "
        "<out>/<variant name>.safetensors, the base read once",
    )
    p.add_argument(
        "--variant2", help="Second variant model or LoRA. Enables dual-variant extraction: common (default) or union (--union)."
    )
    p.add_argument("--out", help="Output safetensors path (required unless --list-layers)")
    p.add_argument("--rank", type=int, default=0, help="LoRA rank (0 = auto-select, higher = more accurate but larger)")
    p.add_argument(
        "--rank-thresh", type=float, default=0.95, help="Explained-variance threshold for auto rank selection (default: 0.95)"
    )
    p.add_argument("--rank-max", type=int, default=64, help="Upper bound on auto-selected rank (default: 64)")
    p.add_argument(
        "--min-dim", type=int, default=32, help="Skip layers whose smallest dimension is below this value (default: 32)"
    )
    p.add_argument("--exclude", default="", help='Comma-separated key segments to exclude, e.g. "refiner,embed"')
    p.add_argument("--include", default="", help='Comma-separated key segments to include (all others skipped), e.g. "attn,ff"')
    p.add_argument(
        "--full-layer",
        action="store_true",
        help="Also process 1D tensors (Norm weight/bias) stored as .diff; disables min-dim filter",
    )
    p.add_argument(
        "--union",
        action="store_true",
        help="With --variant2: output the weighted union of both variants instead of the common (intersection) component",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="--union balance: weights are w1=2*alpha, "
        "w2=2*(1-alpha), summing to 2. Default 0.5 gives delta1 + delta2 equally. 0.75 -> "
        "1.5*delta1 + 0.5*delta2. Range [0, 1].",
    )
    p.add_argument("--checkpoint", action="store_true", help="Save as checkpoint (base + low-rank-approx delta) instead of LoRA")
    p.add_argument(
        "--checkpoint-full",
        action="store_true",
        help="Save as checkpoint (base + full-precision delta, no SVD) for the selected layers; 1-D weights "
        "(norms, biases) and layers below --min-dim stay at the base unless --full-layer is given",
    )
    p.add_argument("--verbose", action="store_true", help="Print per-layer S stats and show summary at the end")
    p.add_argument("--summary", action="store_true", help="Print grouped summary table at the end (no per-layer detail)")
    p.add_argument(
        "--detail", action="store_true", help="Also save the residual (delta minus first LoRA) as out_detail.safetensors"
    )
    p.add_argument(
        "--detail-scale",
        type=float,
        default=1.0,
        help="Multiply detail LoRA weights by this factor before saving. Use >1.0 to pre-amplify "
        "so the loader weight can stay near 1.0 (default: 1.0)",
    )
    extra = p.add_argument_group("ckpt2lora additions")
    extra.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="LoRA key style. auto: kohya names for SD1.5/SDXL; for Z-Image "
        "diffusion_model.<diffusers name>.lora_A/B with q/k/v split (ComfyUI, diffusers, Forge Neo builds "
        "that keep every patch of a weight). neo: what every Forge Neo era applies whole: for Z-Image "
        "comfy, else auto. Z-Image also: diffusers (transformer.<name>), comfy (ComfyUI's names, one fused "
        "qkv module as exact as the split ones, --rank N per part; ComfyUI and every Neo era, not diffusers).",
    )
    extra.add_argument(
        "--save-dtype",
        default="auto",
        choices=SAVE_DTYPES,
        help="dtype of the saved factors (default: the base's half-precision type)",
    )
    extra.add_argument("--device", default="auto", help="auto (CUDA, else Apple MPS, else the CPU), cpu, mps, cuda or cuda:N")
    extra.add_argument(
        "--svd", default="randomized", choices=SVD_MODES, help="randomized (fast, same ranks) or exact (full SVD, for reference)"
    )
    budget = p.add_argument_group("global rank budget (instead of the per-layer --rank-thresh rule)")
    budget.add_argument(
        "--target-size",
        default="",
        help="Choose every layer's rank together for the most faithful LoRA of this file size, e.g. 100MB, "
        "1.5GB, 300MiB (MB = 10^6 bytes); --rank-max still caps each layer, every changed layer keeps rank 1 or more",
    )
    budget.add_argument(
        "--target-energy",
        type=float,
        default=0.0,
        help="Choose every layer's rank together, in the order --budget-objective gives, until the LoRA keeps "
        "this fraction of the whole model's delta energy (sum of kept s^2 / sum of ||delta||^2, e.g. 0.9)",
    )
    budget.add_argument(
        "--budget-objective",
        default="balanced",
        choices=BUDGET_OBJECTIVES,
        help="What a budget maximises per byte: balanced (each triplet's energy over its layer's delta norm; "
        "default: measured to beat the per-layer rule on both model-wide energy and mean layer-output error), "
        "relative (energy over the layer's weight norm), energy (raw energy), fraction (each layer's own "
        "captured fraction)",
    )
    extra.add_argument(
        "--list-layers",
        action="store_true",
        help="Dry run: list each layer with its shape and whether it would be extracted (and why not), "
        "then stop; reads headers only, writes nothing, needs no --out",
    )
    extra.add_argument(
        "--merge",
        nargs="+",
        metavar="LORA[:WEIGHT]",
        help="Merge these LoRAs (weight 1 unless given, e.g. a.safetensors:0.5 b.safetensors:-0.7) into one LoRA "
        "at --rank / --rank-thresh / --target-size, no base needed; one file resizes it",
    )
    extra.add_argument("--overwrite", action="store_true", help="Replace an existing output file")
    extra.add_argument("--strict", action="store_true", help=f"Refuse models that are not {KNOWN_FAMILIES}")
    extra.add_argument("--report-json", help="Also write the report (summary and per-layer data) as JSON")
    wan = p.add_argument_group("Wan 2.2 A14B's two experts (high-noise and low-noise files, shaped alike)")
    wan.add_argument(
        "--expert",
        default="",
        choices=("high", "low"),
        help="Which Wan 2.2 expert --base/--variant are (recorded in the LoRA's metadata; the base must be that expert)",
    )
    wan.add_argument("--base-low", help="With --variant-low: also extract the low-noise expert pair in this run; "
                     "--base/--variant are then the high-noise pair and --out NAME writes NAME_high and NAME_low")
    wan.add_argument("--variant-low", help="The low-noise expert's fine-tune (with --base-low)")
    extra.add_argument("--debug", action="store_true", help="Show a traceback on errors")
    extra.add_argument("--version", action="version", version=f"ckpt2lora {VERSION}")
    return p


def _program_name() -> str:
    """How the user started us: the ``ckpt2lora`` command of a pip install, or the module."""
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return "python -m lib_ckpt2lora" if name in ("", "__main__", "-c") else name


def options_from_args(args: argparse.Namespace) -> ExtractOptions:
    names = [f for f in ExtractOptions.__dataclass_fields__ if f != "extra_metadata"]
    return ExtractOptions(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def run(stop: SignalFlag | None = None) -> None:
    """The command (``ckpt2lora``, ``python -m lib_ckpt2lora``): main(), then the exit with
    SIGINT and SIGTERM ignored. The interpreter resets their handlers to the default while
    it exits, so a Ctrl-C landing there would end the process by the signal instead of 130."""
    try:
        code = main(stop=stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


def main(argv: list[str] | None = None, stop: SignalFlag | None = None) -> int:
    """``stop``: set by a Ctrl-C or SIGTERM that came before main() (``__main__`` records them)."""
    stop = stop if stop is not None else SignalFlag()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        from .toolbox.merge_cli import run_merge

        return run_merge(parser, args, stop)
    if args.base is None or args.variant is None:
        parser.error("the following arguments are required: --base and --variant (or --merge LORA ...)")
    if len(args.variant) > 1:  # a batch (toolbox/batch.py): one LoRA per variant, the base read once
        from .toolbox.batch import run_cli

        _leave_a_core_for_the_reader(args.device)

        return run_cli(args, stop)
    args.variant = args.variant[0]
    if args.out is None and not args.list_layers:
        parser.error("the following arguments are required: --out (or pass --list-layers for a dry run)")
    if args.list_layers:
        code = _list_layers(args)
        return _interrupted() if stop.is_set() else code
    _return_freed_memory_to_the_system(args.checkpoint or args.checkpoint_full)
    running = SignalFlag()
    _install_signal_handlers(stop, running)
    results: list = []
    try:
        runs = _runs(args, options_from_args(args))
        if args.report_json and not Path(args.report_json).parent.is_dir():
            raise UserError(f"The folder {Path(args.report_json).parent} for --report-json does not exist; create it first.")
        from .extract import extract

        _leave_a_core_for_the_reader(args.device)
        if stop.is_set():  # pressed while starting up
            raise Cancelled()
        running.set()
        try:
            for opts in runs:
                results.append((opts, extract(opts, progress=_progress_bar(), should_stop=stop.is_set)))
        finally:
            running.clear()
    except (UserError, Cancelled) as error:
        if args.debug:
            raise
        _print_results(args, results)
        print(f"ckpt2lora: {_after_saved(error, results)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        _print_results(args, results)
        print(f"ckpt2lora: {_after_saved(Cancelled(), results)}", file=sys.stderr)
        return Cancelled.exit_code
    _print_results(args, results)
    return 0


def _print_results(args: argparse.Namespace, results: list) -> None:
    for opts, result in results:
        checkpoint = opts.checkpoint or opts.checkpoint_full
        print_run(result.report, result.outputs, args, opts.report_json, show_format=not checkpoint)


def _after_saved(error: Exception, results: list) -> str:
    """The error's sentence; when an earlier run of this command (the high-noise expert)
    already saved its files, the sentence says those are kept and complete."""
    if not results:
        return str(error)
    saved = ", ".join(str(path) for _, result in results for path in result.outputs)
    text = str(error)
    if isinstance(error, Cancelled):
        text = "Interrupted"
    return f"{text.rstrip('.')}; already saved and complete: {saved}."


def print_run(report, outputs, args: argparse.Namespace, report_json=None, show_format: bool = True, label: str = "") -> None:
    """What a run prints when it is done (an extraction, each of a batch's variants, a merge):
    per-layer lines (--verbose), the table (--summary), the JSON report, each file saved, the
    budget chosen, and which loaders apply the file; ``label`` heads a batch variant's lines."""
    if label and (args.verbose or args.summary):
        print(f"== {label} ==")
    if args.verbose:
        print(report.verbose_text())
    if args.summary or args.verbose:
        print(report.summary_text())
    if report_json:
        Path(report_json).write_text(json.dumps(report.to_dict(), indent=1))
    for path in outputs:
        print(f"Saved {path} ({format_size(path.stat().st_size)}, {len(report.layers)} LoRA layers).")
    for line in report.budget_lines():
        print(f"{label}: {line}" if label else line)
    if show_format and report.loads_in:
        print(f"Format {report.format}: {report.loads_in}.")


def _runs(args: argparse.Namespace, opts: ExtractOptions) -> list[ExtractOptions]:
    """One run, or with --base-low/--variant-low one per Wan 2.2 expert. Both expert pairs
    are planned (headers only) and both outputs checked before the first is extracted, so
    a wrong low-noise file fails at once, not after the high-noise LoRA is written."""
    if not (args.base_low or args.variant_low):
        return [opts]
    if not (args.base_low and args.variant_low):
        raise UserError("Give both --base-low and --variant-low (the low-noise expert's base and fine-tune).")
    if args.expert:
        raise UserError("--base-low/--variant-low set the experts themselves (--base/--variant = high); drop --expert.")
    from .listing import list_layers
    from .writing import check_output_path

    runs = list(expert_pair(opts, args.base_low, args.variant_low))
    for run in runs:
        check_output_path(run.out, run.overwrite)
        list_layers(replace(run, out=None))
    return runs


def _interrupted() -> int:
    print(f"ckpt2lora: {Cancelled()}", file=sys.stderr)
    return Cancelled.exit_code


def _list_layers(args: argparse.Namespace) -> int:
    from .listing import list_layers

    try:
        listing = list_layers(options_from_args(args))
    except UserError as error:
        if args.debug:
            raise
        print(f"ckpt2lora: {error}", file=sys.stderr)
        return error.exit_code
    print(listing.text())
    return 0


def _return_freed_memory_to_the_system(checkpoint: bool = True) -> None:
    """Make glibc serve every block of 1 MiB or more by mmap, so a freed tensor goes back to
    the system at once. By default glibc raises that threshold as large blocks are freed
    and then keeps them in its heap: a streaming run would look as big as the model.

    Only for a checkpoint output (its whole tensors; 1-block Z-Image --checkpoint: 1.59 GB
    peak, 1.67 GB with glibc's policy). A LoRA run keeps glibc's policy, as in the WebUI:
    its large deltas are reused (sources.SpareDeltas), and every scratch block of the SVD
    mapped afresh faulted on each page (1-block Z-Image: 493 k page faults against 185 k
    with glibc's policy, SD1.5 962 k against 187 k, ~2 us each; peak RSS +10-20 MB;
    benchmarks/README.md, issue 18)."""
    if not checkpoint or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


def _leave_a_core_for_the_reader(device: str) -> None:
    """On the CPU, the reader thread's own operations on one thread (prefetch.READER_THREADS)
    and torch's intra-op threads one fewer than the CPUs this process may use (no more than
    torch's own default, and as OMP_NUM_THREADS says where it is set): the reader forms the
    next deltas the whole time beside them. On this project's 2-CPU machine (SD1.5 pair,
    benchmarks/README.md) one computing thread beside the reader took less wall and CPU time
    than two, which spent theirs contending with it. The CLI owns its process; the WebUI
    and ComfyUI keep their host's setting."""
    import torch

    from . import prefetch
    from .devices import resolve_device

    try:
        if resolve_device(device).type != "cpu":
            return
    except UserError:
        return  # the run reports it
    prefetch.READER_THREADS = 1
    if "OMP_NUM_THREADS" in os.environ:
        return
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = min(torch.get_num_threads(), max(1, available - 1))
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)


def _progress_bar():
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, layer: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="layer", dynamic_ncols=True, leave=False)
        bar.set_postfix_str(layer[-40:], refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _install_signal_handlers(stop: SignalFlag, running: SignalFlag) -> None:
    """SIGTERM (and a first Ctrl-C) ask the run to stop after the current layer."""

    def handler(signum, frame):
        # A second Ctrl-C while the run is going stops it now (once); any other press only
        # asks for the stop, so it cannot break a clean-up or the exit under way. The flags
        # take no lock: this handler may run again inside itself (see SignalFlag).
        if stop.is_set() and running.is_set():
            running.clear()
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
