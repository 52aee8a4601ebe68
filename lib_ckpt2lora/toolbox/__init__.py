"""The LoRA toolbox: merge, resize and batch extraction (issue 20)."""
