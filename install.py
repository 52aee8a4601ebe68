"""WebUI installer hook: installs only what the WebUI's Python lacks.

The WebUI runs this file with its own Python at start-up (``launch.run_extension_installer``).
ckpt2lora needs torch, safetensors, numpy and tqdm, which every WebUI already has, so
normally nothing happens. A package that is missing is installed without a version, so
nothing the WebUI pins is ever changed or downgraded; torch is never installed here
(the WebUI chooses its own build).
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
        print("ckpt2lora: install.py is run by the WebUI; outside it use: pip install -r requirements.txt")
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
