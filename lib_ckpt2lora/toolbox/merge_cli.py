"""``python -m lib_ckpt2lora --merge A.safetensors:0.5 B.safetensors --out M.safetensors``:
the command line of a merge or resize, on the extraction's flags where they mean the same."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Cancelled, SignalFlag, UserError

# Extraction flags that mean nothing for a merge: refused rather than silently ignored.
NOT_FOR_MERGE = (
    "base",
    "variant",
    "variant2",
    "checkpoint",
    "checkpoint_full",
    "detail",
    "union",
    "list_layers",
    "expert",
    "base_low",
    "variant_low",
)


def run_merge(parser: argparse.ArgumentParser, args: argparse.Namespace, stop: SignalFlag) -> int:
    """``stop``: the command's (set by a Ctrl-C or SIGTERM, also one pressed while it started)."""
    from .. import cli
    from .merge_run import MergeOptions, merge_loras

    given = [f"--{name.replace('_', '-')}" for name in NOT_FOR_MERGE if getattr(args, name, None)]
    if given:
        parser.error(f"--merge makes a LoRA from LoRAs alone; drop {', '.join(given)}")
    if args.out is None:
        parser.error("the following arguments are required: --out (the merged LoRA)")
    running = SignalFlag()
    cli._install_signal_handlers(stop, running)
    try:
        opts = MergeOptions(
            inputs=list(args.merge),
            out=Path(args.out),
            rank=args.rank,
            rank_thresh=args.rank_thresh,
            rank_max=args.rank_max,
            target_size=args.target_size,
            target_energy=args.target_energy,
            budget_objective=args.budget_objective,
            format=args.format,
            save_dtype=args.save_dtype,
            device=args.device,
            overwrite=args.overwrite,
        )
        if args.report_json and not Path(args.report_json).parent.is_dir():
            raise UserError(f"The folder {Path(args.report_json).parent} for --report-json does not exist; create it first.")
        if stop.is_set():  # pressed while starting up
            raise Cancelled()
        running.set()
        try:
            result = merge_loras(opts, progress=cli._progress_bar(), should_stop=stop.is_set)
        finally:
            running.clear()
    except (UserError, Cancelled) as error:
        if args.debug:
            raise
        print(f"ckpt2lora: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("ckpt2lora: Interrupted: nothing was written.", file=sys.stderr)
        return 130
    cli.print_run(result.report, result.outputs, args, args.report_json)
    return 0
