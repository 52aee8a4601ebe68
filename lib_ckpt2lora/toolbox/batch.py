"""Batch extraction: several variants against one base, each base tensor read once.

``python -m lib_ckpt2lora --base B --variant V1 V2 V3 --out DIR/`` writes
``DIR/<variant stem>.safetensors`` for each variant. Every variant is planned against the
same opened base (planning.open_base, headers only), then one stream goes over the union
of their units in the base's order: per unit the base tensor is read once, then each
variant's tensor in turn, and each variant's own Runner computes its step, exactly as a
single run would (same units, same seeded generator per variant, so the same factors).
Memory: one base layer and the prefetched variant layers, plus every variant's factors
(with a budget, every variant's candidates up to --rank-max).

A variant that fails (missing, damaged, another family, identical to the base, its output
already there) is named and skipped; the others are written. An interrupt while the
layers stream writes nothing; one during the final writes keeps the LoRAs already
written (each complete: files are renamed into place whole) and writes no more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..budget import format_size
from ..constants import PREFETCH_DEPTH
from ..devices import fast_matmuls, resolve_device
from ..errors import Cancelled, SignalFlag, UserError
from ..extract import ExtractResult, LoraTensors, Progress, Runner, write_lora_outputs
from ..lora_format import complete_attention_groups
from ..options import ExtractOptions
from ..planning import Plan, Unit, detail_output, open_base, plan_against, refuse_output_over_an_input
from ..prefetch import prefetched
from ..svd import release_scratch
from ..writing import check_output_path


@dataclass
class VariantOutcome:
    """One variant of a batch: its output and result, or the sentence saying why it failed."""

    variant: Path
    out: Path
    result: ExtractResult | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.result is not None


@dataclass
class BatchResult:
    architecture: str
    outcomes: list[VariantOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[VariantOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.ok]


@dataclass
class _Member:
    """A variant in the stream: its plan, runner and collected tensors."""

    outcome: VariantOutcome
    opts: ExtractOptions
    plan: Plan
    runner: Runner
    collected: LoraTensors

    @property
    def failed(self) -> bool:
        return self.outcome.error is not None


def batch_outputs(variants: Sequence[Path], out_dir: Path) -> list[Path]:
    """``out_dir/<variant stem>.safetensors`` per variant; two variants may not share a name."""
    outputs, seen = [], {}
    for variant in variants:
        out = out_dir / f"{variant.stem}.safetensors"
        key = out.name.lower()  # Windows and macOS folders ignore case
        if key in seen:
            raise UserError(
                f"The variants {seen[key]} and {variant} would both be written as {out}; rename one "
                "(or run it on its own with its own --out)."
            )
        seen[key] = variant
        outputs.append(out)
    return outputs


def refuse_in_batch(opts: ExtractOptions) -> None:
    """What a batch cannot do, in one sentence each."""
    if opts.variant2 is not None or opts.union:
        raise UserError("--variant2 and --union combine two variants into one LoRA; give a single --variant with them.")
    if opts.checkpoint or opts.checkpoint_full:
        raise UserError("--checkpoint and --checkpoint-full write one checkpoint per run; give a single --variant with them.")


def extract_batch(
    opts: ExtractOptions,
    variants: Sequence[Path | str],
    out_dir: Path | str,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> BatchResult:
    """Extract one LoRA per variant into ``out_dir``; ``opts`` gives every other setting
    (its ``variant`` and ``out`` are ignored). Raises UserError for a problem of the whole
    run (the base, the options, the folder), Cancelled on an interrupt; a variant's own
    problem is recorded in its outcome and the others go on."""
    log = log or _log_to_stderr
    variants = [Path(variant) for variant in variants]
    out_dir = Path(out_dir)
    if not variants:
        raise UserError("Give at least one --variant.")
    if not out_dir.is_dir():
        raise UserError(
            f"With several variants --out must be an existing folder (each LoRA is written there as "
            f"<variant name>.safetensors), and {out_dir} is not one; create it first."
        )
    per_variant = [
        # detail_out (the tab's) would name one file for all: each detail LoRA goes beside its LoRA
        dataclasses.replace(opts, variant=variant, out=out, detail_out=None, report_json=None)
        for variant, out in zip(variants, batch_outputs(variants, out_dir))
    ]
    refuse_in_batch(opts)
    per_variant[0].validate()  # the same settings for every variant: checked once
    device = resolve_device(opts.device)
    with contextlib.ExitStack() as stack:
        stack.callback(release_scratch)  # a WebUI/ComfyUI worker thread outlives the run
        stack.enter_context(fast_matmuls(device))
        opened = open_base(per_variant[0], stack, log)
        result = BatchResult(opened.arch.name)
        members = []
        for variant_opts in per_variant:
            outcome = VariantOutcome(variant_opts.variant, variant_opts.out)
            result.outcomes.append(outcome)
            try:
                refuse_output_over_an_input(variant_opts)
                check_output_path(variant_opts.out, opts.overwrite)
                if opts.detail:
                    check_output_path(detail_output(variant_opts), opts.overwrite)
                plan = plan_against(opened, variant_opts, stack, log)
            except UserError as error:
                _fail(outcome, error, log)
                continue
            runner = Runner(plan, variant_opts, device, log)
            members.append(_Member(outcome, variant_opts, plan, runner, LoraTensors(plan, variant_opts)))
        _stream(opened.view, members, device, progress, should_stop)
        _finish(members, should_stop, log)
    return result


def _stream(base_view, members: list[_Member], device: torch.device, progress, should_stop) -> None:
    """One pass over the base: per unit its base tensor once, then each variant's step."""
    position = {key: index for index, key in enumerate(base_view.shapes)}
    by_parts: dict[tuple[str, ...], list[tuple[_Member, Unit]]] = {}
    for member in members:
        for unit in member.plan.units:
            by_parts.setdefault(unit.parts, []).append((member, unit))
    items = [
        (parts, member, unit)
        for parts in sorted(by_parts, key=lambda parts: position[parts[0]])
        for member, unit in by_parts[parts]
    ]
    if not items:
        return
    prepare = members[0].runner.prepare  # every runner has the same device
    shared: dict[str, object] = {"parts": None, "bases": None}  # the reader thread's base layer

    def load(item):
        parts, member, unit = item
        if member.failed:
            return None
        if shared["parts"] != parts:
            shared["bases"] = None  # let the previous layer go before reading the next
            shared["bases"] = [prepare(base_view.read(part)) for part in parts]  # a base problem stops the run
            shared["parts"] = parts
        try:
            return member.runner.load(unit, shared["bases"])
        except UserError as error:  # this variant's file (e.g. truncated): only it fails
            return error

    on_device: tuple = (None, None)  # (parts, the base tensors on the compute device)
    with contextlib.closing(prefetched(items, load, PREFETCH_DEPTH)) as stream:
        for done, ((parts, member, unit), loaded) in enumerate(stream):
            if should_stop is not None and should_stop():
                raise Cancelled()
            if isinstance(loaded, UserError):
                _fail(member.outcome, loaded, member.runner.log)
                member.collected = LoraTensors(member.plan, member.opts)  # drop what it had
            elif loaded is not None and not member.failed:
                if on_device[0] != parts:  # one copy to the device per layer, not per variant
                    on_device = (None, None)
                    on_device = (parts, [tensor.to(device, non_blocking=True).float() for tensor in loaded[0]])
                step = member.runner.compute(unit, (on_device[1], loaded[1]), member.collected.candidates)
                member.collected.add(unit, step)
            del loaded
            if progress is not None:
                progress(done + 1, len(items), f"{member.outcome.variant.stem}: {unit.key}")


def _finish(members: list[_Member], should_stop, log) -> None:
    """Per variant: the end-of-run checks, the budget, the write. An interrupt here keeps
    the LoRAs already written and writes no more."""
    written: list[Path] = []
    for member in members:
        if member.failed:
            member.collected = None  # its factors go now
            continue
        if should_stop is not None and should_stop():
            kept = ", ".join(path.name for path in written) or "nothing"
            raise Cancelled(f"Interrupted: written before the stop: {kept}; the other variants were not written.")
        plan, opts = member.plan, member.opts
        try:
            member.runner.finish()
            main = complete_attention_groups(plan, opts, member.collected.finish(), "LoRA")
            detail = complete_attention_groups(plan, opts, member.collected.detail, "detail LoRA")
            outputs = write_lora_outputs(plan, opts, main, detail)
        except UserError as error:
            _fail(member.outcome, error, log)
            continue
        finally:
            member.collected = None
        written.extend(outputs)
        for line in plan.report.warnings:
            log(f"Warning ({opts.variant.name}): {line}")
        member.outcome.result = ExtractResult(outputs, plan.arch.name, plan.report, list(plan.report.warnings))


def run_cli(args, stop: SignalFlag) -> int:
    """``--variant`` with several files on the command line (cli.main dispatches here):
    one report per output, one line per variant at the end; exit 2 when any variant
    failed (the others are written), 130 on an interrupt. ``stop``: the command's (set by
    a Ctrl-C or SIGTERM, also one pressed while it started)."""
    from ..cli import _install_signal_handlers, _progress_bar, _return_freed_memory_to_the_system, options_from_args, print_run

    _return_freed_memory_to_the_system()
    running = SignalFlag()
    _install_signal_handlers(stop, running)
    try:
        if args.list_layers:
            raise UserError("--list-layers reads one variant; give a single --variant with it.")
        if args.out is None:
            raise UserError("With several variants give the output folder with --out DIR.")
        if getattr(args, "base_low", None) or getattr(args, "variant_low", None):
            raise UserError("--base-low/--variant-low pair one Wan 2.2 fine-tune's experts; give a single --variant with them.")
        report_dir = Path(args.report_json) if args.report_json else None
        if report_dir is not None and not report_dir.is_dir():
            raise UserError(
                f"With several variants --report-json must be an existing folder (each report is written there as "
                f"<variant name>.json), and {report_dir} is not one; create it first."
            )
        variants = [Path(variant) for variant in args.variant]
        opts = options_from_args(argparse_copy(args, variant=variants[0], out=None, report_json=None))
        if stop.is_set():  # pressed while starting up
            raise Cancelled()
        running.set()
        try:
            batch = extract_batch(opts, variants, Path(args.out), progress=_progress_bar(), should_stop=stop.is_set)
        finally:
            running.clear()
    except (UserError, Cancelled) as error:
        if args.debug:
            raise
        print(f"ckpt2lora: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("ckpt2lora: Interrupted: no partial file was left (LoRAs written before the stop stay).", file=sys.stderr)
        return 130
    for outcome in batch.outcomes:
        if outcome.ok:
            report_json = report_dir / f"{outcome.variant.stem}.json" if report_dir is not None else None
            print_run(outcome.result.report, [], args, report_json, show_format=False, label=outcome.variant.name)
    loads_in = next((o.result.report for o in batch.outcomes if o.ok), None)
    if loads_in is not None and loads_in.loads_in:
        print(f"Format {loads_in.format}: {loads_in.loads_in}.")
    for outcome in batch.outcomes:
        if outcome.ok:
            sizes = ", ".join(f"{path} ({format_size(path.stat().st_size)})" for path in outcome.result.outputs)
            print(f"Saved   {outcome.variant.name}: {sizes}, {len(outcome.result.report.layers)} LoRA layers.")
        else:
            print(f"FAILED  {outcome.variant.name}: {outcome.error}")
    failed = len(batch.failed)
    if failed:
        print(f"ckpt2lora: {failed} of {len(batch.outcomes)} variants failed (named above); the others were written.")
        return UserError.exit_code
    return 0


def argparse_copy(args, **changes):
    """A copy of parsed arguments with some values changed."""
    import argparse

    values = vars(args).copy()
    values.update(changes)
    return argparse.Namespace(**values)


def _fail(outcome: VariantOutcome, error: UserError, log) -> None:
    outcome.error = str(error)
    log(f"Skipped {outcome.variant.name}: {error}")


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)
