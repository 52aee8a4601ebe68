"""Stub of Forge Neo's Lora extension network.py: LoRA presets instead of SdVersion.

Neo builds the list as ["Unknown"] + modules_forge.presets.PresetArch.choices().
"""

SD_VERSION = ["Unknown", "sd", "xl", "flux", "klein", "qwen", "lumina", "zit", "wan", "anima"]


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.alias = name
