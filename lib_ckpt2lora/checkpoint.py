"""Checkpoint outputs: base + low-rank delta (--checkpoint) or + full delta (--checkpoint-full).

The output has every key of the base with the base's own dtype and shape, in the base's
order, so its header is known before any work; tensors are then computed and streamed
one raw key at a time (a fused q|k|v weight gathers its three row ranges first). Peak
memory is a few tensors whatever the model's size.

With --detail (low-rank checkpoints only) the residual each layer's low-rank change missed
is extracted as a LoRA, written beside the checkpoint (or to ``opts.detail_out``): base +
checkpoint's change + detail LoRA on top gets closer to the variant, as with a LoRA run.
The detail LoRA is written once the checkpoint is complete; both files are staged under
temporary names and renamed together (writing.output_group), so a failure of either,
even of the second rename under --overwrite, leaves the old files as they were.
"""

from __future__ import annotations

import shutil
from collections import defaultdict

import torch

from .constants import PREFETCH_DEPTH
from .errors import Cancelled, UserError
from .layer_step import record_of
from .lora_format import complete_attention_groups, lora_file_metadata, unit_tensors
from .metadata import tool_metadata
from .planning import detail_output
from .prefetch import prefetched
from .writing import check_output_path, output_group, write_streamed

# Room beyond the model's size kept free on the disk (filesystem metadata, other writers).
DISK_MARGIN_BYTES = 64 * 2**20


def write_checkpoint(plan, opts, runner, progress, should_stop):
    """Stream base + each unit's change (``runner.compute``: layer_step) into the output."""
    base_file = plan.base.file
    check_output_path(opts.out, opts.overwrite)
    if plan.base.scales:  # its weights are written raw: fp8 values plus the LoRA's real-scale delta
        raise UserError(
            f"The base {base_file.path.name} is a scaled-fp8 checkpoint, which --checkpoint cannot write over; "
            "give its bf16/fp16 release as --base (a LoRA output reads scaled fp8 fine)."
        )
    needed = sum(info.numel * torch.empty((), dtype=info.dtype).element_size() for info in base_file.infos.values())
    free = shutil.disk_usage(opts.out.parent).free
    if free < needed + DISK_MARGIN_BYTES:
        raise UserError(
            f"{opts.out.parent} has {free / 2**30:.1f} GiB free but the checkpoint needs "
            f"{needed / 2**30:.1f} GiB; free some space or choose another folder."
        )
    units_by_raw = defaultdict(list)
    for unit in plan.units:
        units_by_raw[plan.base.refs[unit.key].key].append(unit)
    raw_keys = list(base_file.infos)
    total = len(plan.units)
    done = 0
    detail: dict[str, torch.Tensor] = {}

    def load(raw_key):
        base_tensor = base_file.get(raw_key)
        loads = []
        for unit in units_by_raw.get(raw_key, []):
            rows = plan.base.refs[unit.key].rows
            loads.append((unit, runner.load(unit, [base_tensor[rows[0] : rows[1]] if rows else base_tensor])))
        return base_tensor, loads

    # The current tensor and the next one: reading overlaps computing, memory stays flat.
    stream = prefetched(raw_keys, load, PREFETCH_DEPTH)

    def produce(index: int, name: str) -> torch.Tensor:
        nonlocal done
        raw_key, (base_tensor, unit_loads) = next(stream)
        if should_stop is not None and should_stop():
            raise Cancelled()
        if not unit_loads:
            return base_tensor
        value = base_tensor.to(runner.device, dtype=torch.float32, copy=True)
        for unit, loaded in unit_loads:
            step = runner.compute(unit, loaded)
            done += 1
            if progress is not None:
                progress(done, total, unit.key)
            if step is None:
                continue
            if step.full is not None:  # --checkpoint-full, or a 1-D tensor with --full-layer
                plan.report.add(record_of(plan, step, None))
                change = step.full
            else:
                factors = step.joined()
                plan.report.add(record_of(plan, step, factors))
                change = factors.up @ factors.down
                if step.detail is not None and unit.module is not None:
                    detail.update(unit_tensors(plan, opts, unit, step.detail, opts.detail_scale))
            rows = plan.base.refs[unit.key].rows
            target = value[rows[0] : rows[1]] if rows else value
            target += change.reshape(unit.shape).to(value.device)
        return value.to("cpu", base_tensor.dtype)

    metadata = dict(base_file.metadata)
    metadata.update(tool_metadata(opts, plan.arch, "checkpoint", "checkpoint-full" if opts.checkpoint_full else "checkpoint"))
    entries = [(key, info.dtype, info.shape) for key, info in base_file.infos.items()]
    written: list = []
    try:
        with output_group(opts.overwrite) as group:

            def before_rename() -> None:
                runner.finish()
                if opts.detail and detail:
                    written.append(write_detail_lora(plan, opts, detail, group))
                elif opts.detail:
                    plan.report.warnings.append("The low-rank change holds the whole difference: no detail LoRA was written.")

            write_streamed(opts.out, entries, produce, metadata, opts.overwrite, before_rename=before_rename, group=group)
    finally:
        stream.close()
    return [opts.out, *written]


def write_detail_lora(plan, opts, detail: dict[str, torch.Tensor], group=None):
    from .writing import write_tensors

    path = detail_output(opts)
    detail = complete_attention_groups(plan, opts, detail, "detail LoRA")
    write_tensors(path, detail, lora_file_metadata(plan, opts, detail, path, "detail"), opts.overwrite, group=group)
    return path
