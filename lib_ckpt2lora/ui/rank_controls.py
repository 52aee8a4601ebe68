"""The rank controls the extraction and the "Merge LoRAs" sections share: Rank, Energy to
keep, Max rank and Target size, one row, with the same ranges and defaults' fields."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr


def rank_controls(c: dict, defaults, element_id: Callable[[str], str], size_info: str) -> None:
    """Adds ``rank``, ``rank_thresh``, ``rank_max`` and ``target_size`` to ``c``; ``defaults``
    is the section's form (job.Form or merge_job.MergeForm)."""
    with gr.Row():
        c["rank"] = gr.Slider(
            label="Rank",
            info="0 = automatic",
            minimum=0,
            maximum=512,
            step=1,
            value=defaults.rank,
            elem_id=element_id("rank"),
        )
        c["rank_thresh"] = gr.Slider(
            label="Energy to keep",
            info="automatic rank",
            minimum=0.5,
            maximum=1.0,
            step=0.005,
            value=defaults.rank_thresh,
            elem_id=element_id("rank_thresh"),
        )
        c["rank_max"] = gr.Slider(
            label="Max rank",
            info="automatic rank",
            minimum=1,
            maximum=512,
            step=1,
            value=defaults.rank_max,
            elem_id=element_id("rank_max"),
        )
        # Empty or 0: the per-layer rule above. A size: the ranks of all layers chosen together
        # for that file size (MB = 1,000,000 bytes), each layer still at most Max rank.
        # No minimum=: gradio would refuse a negative size with its own popup, before the job;
        # the job refuses it in the status, like every other mistake.
        c["target_size"] = gr.Number(
            label="Target size (MB)", info=size_info, value=defaults.target_size, elem_id=element_id("target_size")
        )
