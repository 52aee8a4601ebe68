"""The LoRA toolbox: what model makers do with LoRAs besides extracting one (merge, resize, batch)."""
