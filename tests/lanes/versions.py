"""Print the versions a test lane runs on, in one line (Python, torch, numpy, ...)."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "numpy", "safetensors", "gradio", "diffusers", "transformers", "peft", "lycoris-lora")


def main() -> None:
    found = [f"Python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    print(", ".join(found))


if __name__ == "__main__":
    main()
