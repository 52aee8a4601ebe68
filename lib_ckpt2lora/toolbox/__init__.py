"""The LoRA toolbox: what model makers do with LoRAs besides extracting them (merge, resize, batch)."""
