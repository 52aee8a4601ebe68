"""Stub of the Lora extension's network.py (A1111 / lllyasviel Forge flavour)."""

import enum


class SdVersion(enum.Enum):
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.alias = name
