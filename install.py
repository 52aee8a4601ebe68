"""WebUI installer hook: installs only what the WebUI's Python lacks.

The WebUI runs this file with its own Python at start-up (``launch.run_extension_installer``).
ckpt2lora needs torch, safetensors, numpy and tqdm, which every WebUI already has, so
normally nothing happens. A package that is missing is installed without a version, so
nothing the WebUI pins is ever changed or downgraded; torch is never installed here
(the WebUI chooses its own build).

ComfyUI-Manager also runs this file (``python install.py`` in this folder, after
``pip install`` of each requirements.txt line, torch skipped by its pip blacklist): without
the WebUI's ``launch`` module it prints one line and installs nothing.
"""

import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
NEVER_INSTALL = {"torch"}  # the WebUI's own build (CUDA/ROCm/CPU) must stay


def required_names(path: Path = REQUIREMENTS) -> list[str]:
    names = []
    for line in path.read_text(encoding="utf8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]
        if name:
            names.append(name)
    return names


def main() -> None:
    try:
        import launch
    except ImportError:
        # ComfyUI-Manager runs this file too, after installing requirements.txt itself: nothing left to do.
        print(
            "ckpt2lora: nothing to install here (ComfyUI-Manager installs requirements.txt itself; "
            "for the command line: pip install -r requirements.txt)."
        )
        return
    for name in required_names():
        if launch.is_installed(name):
            continue
        if name.lower() in NEVER_INSTALL:
            print(f"ckpt2lora: {name} is missing from the WebUI's Python; install the WebUI's own {name} build.")
            continue
        launch.run_pip(f"install {name}", f"{name} for ckpt2lora")


if __name__ == "__main__":  # the WebUI runs it as a script
    main()
