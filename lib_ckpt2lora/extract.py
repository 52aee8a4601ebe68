"""One extraction, start to finish: plan, stream the layers through the per-layer step,
choose the ranks, write.

Per layer: read the base tensor and the variant's (ahead, in a background thread),
delta in fp32 on the compute device, truncated SVD (layer_step), factors cast and moved
to the CPU at once. On the CPU the reader forms the fp32 delta itself, row chunk by row
chunk (sources.read_deltas), so a layer costs its delta alone. Only a few layers are ever
in memory; the LoRA's factors wait in a temporary file beside the output
(writing.SpilledTensors) until it is written. With a global rank budget
(--target-size / --target-energy) every layer's candidates up to --rank-max wait on the
CPU in the save dtype, then allocation.py chooses all ranks together.

Modules, in import order: planning (which units) -> layer_step (delta -> factors) ->
lora_format (names, alpha, metadata) -> allocation (budget) -> this runner; writing.py
writes files; checkpoint.py is the checkpoint output.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .constants import NOT_DERIVED_RELATIVE_DELTA, PREFETCH_DEPTH
from .devices import fast_matmuls, is_out_of_memory, resolve_device
from .errors import Cancelled, UserError
from .layer_step import NOTHING_IN_COMMON, LayerStep, compute_step, record_of
from .lora_format import complete_attention_groups, lora_file_metadata, unit_tensors
from .options import ExtractOptions
from .planning import Plan, Unit, detail_output, make_plan, writes_checkpoint
from .prefetch import prefetched
from .report import Report
from .sources import CheckpointSource, ReadDelta, SpareDeltas, read_deltas
from .svd import release_scratch, takes_rounded_products
from .writing import SpilledTensors, check_output_path, write_all

Progress = Callable[[int, int, str], None]


@dataclass
class ExtractResult:
    outputs: list[Path]
    architecture: str
    report: Report
    warnings: list[str] = field(default_factory=list)


def extract(
    opts: ExtractOptions,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Extract a LoRA (or a checkpoint) as ``opts`` says; see the module docstring."""
    log = log or _log_to_stderr
    if opts.out is None:
        raise UserError("Give the output file with --out (only --list-layers runs without one).")
    opts.validate()
    device = resolve_device(opts.device)
    with contextlib.ExitStack() as stack:
        stack.callback(release_scratch)  # a WebUI/ComfyUI worker thread outlives the run
        stack.enter_context(fast_matmuls(device))  # TF32 on CUDA for this run only
        plan = make_plan(opts, stack, log)  # reads headers only: input problems come first
        check_output_path(opts.out, opts.overwrite)
        if opts.detail:
            check_output_path(detail_output(opts), opts.overwrite)
        if writes_checkpoint(opts):
            from .checkpoint import write_checkpoint

            outputs = write_checkpoint(plan, opts, Runner(plan, opts, device, log), progress, should_stop)
        else:
            main, detail = run_lora(plan, opts, device, progress, should_stop, log)
            for tensors in (main, detail):
                if isinstance(tensors, SpilledTensors):
                    stack.callback(tensors.close)
            main = complete_attention_groups(plan, opts, main, "LoRA")
            detail = complete_attention_groups(plan, opts, detail, "detail LoRA")
            outputs = write_lora_outputs(plan, opts, main, detail)
    for line in plan.report.warnings:
        log("Warning: " + line)
    return ExtractResult(outputs, plan.arch.name, plan.report, list(plan.report.warnings))


class Runner:
    """Streams units through the compute device, with the CPU as fallback per unit."""

    def __init__(self, plan: Plan, opts: ExtractOptions, device: torch.device, log):
        self.plan, self.opts, self.device, self.log = plan, opts, device, log
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.relative_deltas: list[float] = []
        # CPU runs of checkpoints: the reader forms the deltas (read_deltas); the GPU path and
        # LoRA variants read tensors and form the delta on the compute device
        self.reads_deltas = device.type == "cpu" and all(type(source) is CheckpointSource for source in plan.sources)
        # ... and hands a LoRA run's one delta per unit over in bf16 where the SVD takes it so
        # (rounds): not two variants combined, a detail LoRA's residual or a checkpoint's change
        single = len(plan.sources) == 1 and not opts.detail
        self.rounding = self.reads_deltas and single and opts.svd != "exact" and not writes_checkpoint(opts)
        self.spare = SpareDeltas(capacity=_largest_repeated_part(plan))  # deltas handed back by ``recycle``

    def load(self, unit: Unit, bases: list[torch.Tensor] | None = None):
        """Read the base and variant tensors of a unit (runs in the reader thread).

        ``bases``: the unit's base tensors when the caller has already read them."""
        if self.reads_deltas:
            return self.read_deltas(unit, bases)
        if bases is None:
            bases = [self.plan.base.read(part) for part in unit.parts]
        sources = [[source.load(part) for part in unit.parts] for source in self.plan.sources]
        bases = [self.prepare(tensor) for tensor in bases]
        sources = [[self.prepare(item) if torch.is_tensor(item) else item for item in items] for items in sources]
        return bases, sources

    def read_deltas(self, unit: Unit, bases: list[torch.Tensor] | None):
        """On the CPU: the reader forms every delta itself, row chunk by row chunk
        (sources.read_deltas), so a unit holds its fp32 deltas and nothing else."""
        base_parts, source_parts = [], [[] for _ in self.plan.sources]
        rounded = self.rounds(unit)
        for index, part in enumerate(unit.parts):
            given = None if bases is None else self.prepare(bases[index])
            base, deltas = read_deltas(self.plan.base, part, self.plan.sources, given, self.spare, rounded)
            if rounded:
                deltas[0].exact = functools.partial(self._exact_delta, part, given)
            base_parts.append(base)
            for items, delta in zip(source_parts, deltas):
                items.append(delta)
        return base_parts, source_parts

    def rounds(self, unit: Unit) -> bool:
        """Whether the reader hands ``unit``'s delta over rounded to bf16: one part, one row
        block, on the SVD's bf16 route (svd.takes_rounded_products). Its fp32 delta is then
        read again only if the SVD needs it (``_exact_delta``)."""
        if not self.rounding or len(unit.parts) != 1 or len(unit.rows) != 1 or len(unit.shape) < 2:
            return False
        fixed = self.opts.rank_max if self.opts.has_budget else self.opts.rank
        return takes_rounded_products(unit.shape[0], math.prod(unit.shape[1:]), fixed, self.opts.rank_max, False)

    def _exact_delta(self, part: str, base: torch.Tensor | None) -> torch.Tensor:
        """A part's fp32 delta, read again (in the computing thread)."""
        return read_deltas(self.plan.base, part, self.plan.sources, base)[1][0].tensor

    def prepare(self, tensor: torch.Tensor) -> torch.Tensor:
        """On the GPU: pinned 16-bit tensors (half the bytes to copy, widened there). On the
        CPU: widen to fp32 here, in the reader thread, off the computing thread. Prepared
        twice, a tensor comes back as it is (a batch run shares one base tensor)."""
        return tensor.pin_memory() if self.device.type == "cuda" else tensor.float()

    def compute(self, unit: Unit, loaded, candidates: bool = False) -> LayerStep | None:
        """layer_step.compute_step on the compute device, or on the CPU when a CUDA device
        runs out of memory for this unit."""
        try:
            step = compute_step(self.plan, self.opts, unit, loaded, self.device, self.generator, candidates)
        except RuntimeError as error:
            if self.device.type != "cuda" or not is_out_of_memory(error):
                raise
            torch.cuda.empty_cache()
            self.log(f"Warning: {unit.key} does not fit on {self.device}; computing it on the CPU.")
            step = compute_step(self.plan, self.opts, unit, loaded, torch.device("cpu"), None, candidates)
        if step is not None:
            self.relative_deltas.append(step.relative_delta)
        return step

    def recycle(self, loaded, step: LayerStep | None) -> None:
        """Hand a finished unit's deltas back to the reader (SpareDeltas). Only when the step
        kept no delta: a whole (.diff) tensor is the delta itself. The caller drops
        ``loaded`` and never reads it again."""
        if not self.reads_deltas or (step is not None and step.full is not None):
            return
        for items in loaded[1]:
            for item in items:
                if isinstance(item, ReadDelta):
                    self.spare.give(item.tensor)

    def finish(self) -> None:
        self.spare.clear()
        report = self.plan.report
        if self.relative_deltas and statistics.median(self.relative_deltas) > NOT_DERIVED_RELATIVE_DELTA:
            report.warnings.append(
                f"The variant does not look derived from the base: the median layer changes by "
                f"{100 * statistics.median(self.relative_deltas):.0f}% of its weight (fine-tunes and merges "
                "change a few percent); a LoRA from this pair will not reproduce the variant. "
                f"Check that base and variant belong together ({self.plan.arch.mixup_hint})."
            )
        not_finite = report.skipped.get("NaN or Inf in the delta")
        if not self.relative_deltas and not_finite:
            raise UserError(
                f"Nothing to extract: every changed layer of {self.opts.variant.name} holds NaN or Inf "
                f"(first: {not_finite[0]}), so the file is damaged; nothing was written."
            )
        if not self.relative_deltas and report.skipped.get(NOTHING_IN_COMMON):
            raise UserError(
                f"Nothing in common: {self.opts.variant.name} and {self.opts.variant2.name} share no change "
                "above 1% of either delta in any selected layer (use --union to combine them instead); "
                "nothing was written."
            )
        if not self.relative_deltas:
            raise UserError(
                f"No difference to extract: {self.opts.variant.name} matches {self.opts.base.name} in every "
                "selected layer; nothing was written."
            )


def run_lora(plan: Plan, opts, device, progress, should_stop, log) -> tuple[dict, dict]:
    """The LoRA's (and the detail LoRA's) tensors. With a budget, in two phases: every
    layer's candidates first, then allocation.apply_budget chooses all ranks at once."""
    runner = Runner(plan, opts, device, log)
    collected = LoraTensors(plan, opts)
    total = len(plan.units)
    try:
        with contextlib.closing(prefetched(plan.units, runner.load, PREFETCH_DEPTH)) as stream:
            for done, (unit, loaded) in enumerate(stream):
                if should_stop is not None and should_stop():
                    raise Cancelled()
                step = runner.compute(unit, loaded, collected.candidates)
                collected.add(unit, step)
                runner.recycle(loaded, step)
                del loaded, step  # before the reader may start the next unit but one
                if progress is not None:
                    progress(done + 1, total, unit.key)
        runner.finish()
        return collected.finish(), collected.detail
    except BaseException:
        collected.close()  # its temporary file goes now, not whenever the traceback does
        raise


class LoraTensors:
    """A LoRA run's output as its steps come: the LoRA's tensors, the detail LoRA's, and
    (with a budget) the steps whose ranks the budget chooses at the end."""

    def __init__(self, plan: Plan, opts: ExtractOptions):
        self.plan, self.opts = plan, opts
        self.candidates = opts.has_budget
        # Factors wait in a temporary file beside the output, not in memory (writing.SpilledTensors)
        folder = opts.out.parent if opts.out is not None else None
        self.main: dict[str, torch.Tensor] = SpilledTensors(folder)
        self.detail: dict[str, torch.Tensor] = SpilledTensors(folder)
        self.waiting: list[LayerStep] = []

    def add(self, unit: Unit, step: LayerStep | None) -> None:
        plan, opts = self.plan, self.opts
        if step is None:
            return
        if step.full is not None:
            plan.report.add(record_of(plan, step, None))
            if unit.module is not None:
                suffix = ".diff_b" if unit.key.endswith(".bias") else ".diff"
                self.main[unit.module + suffix] = step.full.to("cpu", plan.save_dtype)
        elif self.candidates:
            step.keep_on_cpu(plan.save_dtype)
            self.waiting.append(step)
        else:
            factors = step.joined()
            plan.report.add(record_of(plan, step, factors))
            self.main.update(unit_tensors(plan, opts, unit, factors))
            if step.detail is not None:
                self.detail.update(unit_tensors(plan, opts, unit, step.detail, opts.detail_scale))

    def finish(self) -> dict[str, torch.Tensor]:
        """The LoRA's tensors: as collected, or at the ranks the budget chooses."""
        if not self.candidates:
            return self.main
        from .allocation import apply_budget

        plan, opts = self.plan, self.opts

        def complete(tensors: dict) -> dict:
            return complete_attention_groups(plan, opts, tensors, "LoRA")

        waiting, self.waiting = self.waiting, []
        return apply_budget(plan, opts, waiting, self.main, complete)

    def close(self) -> None:
        """Drop the collected tensors and their temporary file."""
        self.main.close()
        self.detail.close()
        self.waiting = []


def write_lora_outputs(plan: Plan, opts: ExtractOptions, main, detail) -> list[Path]:
    pending = []
    for tensors, path, kind in ((main, opts.out, "main"), (detail if opts.detail else {}, detail_output(opts), "detail")):
        if tensors:
            pending.append((path, tensors, lora_file_metadata(plan, opts, tensors, path, kind)))
    write_all(pending, opts.overwrite)
    return [path for path, _, _ in pending]


def _largest_repeated_part(plan: Plan) -> int:
    """Values of the largest part shape that more than one part has (a block's weights),
    else of the largest part: the size of SpareDeltas' buffers."""
    sizes = Counter(math.prod(plan.base.shapes[part]) for unit in plan.units for part in unit.parts)
    return max((size for size, count in sizes.items() if count > 1), default=max(sizes, default=0))


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)
