"""The Lora tab's user-metadata sidecar: ``<lora name>.json`` beside the LoRA.

The WebUIs read it in ``ui_extra_networks.read_user_metadata`` (the file's path with
``.json`` for its extension). Keys, as their metadata editors write them: "description",
"sd version", "activation text", "preferred weight", "negative text", "notes".
"sd version" decides which model the LoRA card is shown for, and its values differ:
A1111 and lllyasviel's Forge check it against ``network.SdVersion`` ("SD1", "SDXL", ...);
Forge Neo against ``network.SD_VERSION`` (its preset names "sd", "xl", "zit", ...).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from ..writing import set_usual_permissions

# Our architecture names -> the WebUIs' names.
# A1111 / Forge: network.SdVersion members (lllyasviel's Forge adds Flux; a name the running
# WebUI lacks falls back to "Unknown" below).
SDVERSION_NAMES = {"sd15": "SD1", "sdxl": "SDXL", "flux": "Flux", "chroma": "Flux"}
# Forge Neo: network.SD_VERSION = ["Unknown"] + modules_forge.presets.PresetArch names (sd, xl, flux,
# klein, qwen, lumina, zit, wan, anima). Its Lora tab hides a card whose "sd version" is neither
# "Unknown" nor the UI preset; Chroma has no preset of its own and runs under "flux".
PRESET_NAMES = {
    "sd15": "sd",
    "sdxl": "xl",
    "zimage": "zit",
    "flux": "flux",
    "flux2": "klein",
    "chroma": "flux",
    "qwen_image": "qwen",
    "lumina2": "lumina",
    "wan": "wan",
    "anima": "anima",
}
UNKNOWN = "Unknown"


def sd_version_for(architecture: str, network_module=None) -> str:
    """The "sd version" value this WebUI understands for ``architecture``.

    ``network_module`` is the Lora extension's ``network`` module (``sys.modules["network"]``)
    or None outside a WebUI, where A1111's names are used.
    """
    allowed = getattr(network_module, "SD_VERSION", None)
    if allowed is not None:  # Forge Neo
        name = PRESET_NAMES.get(architecture, UNKNOWN)
        return name if name in allowed else UNKNOWN
    members = getattr(getattr(network_module, "SdVersion", None), "__members__", None)
    name = SDVERSION_NAMES.get(architecture, UNKNOWN)
    if members is not None and name not in members:
        return UNKNOWN
    return name


def sidecar_path(lora_path: Path) -> Path:
    return Path(lora_path).with_suffix(".json")


def write_sidecar(
    lora_path: Path,
    *,
    sd_version: str,
    description: str,
    preferred_weight: float = 1,
    activation_text: str = "",
) -> Path:
    """Write (or update) the sidecar; keys a user set by hand that we do not own are kept."""
    path = sidecar_path(lora_path)
    data: dict = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf8"))
            if isinstance(loaded, dict):
                data = loaded
        except (OSError, ValueError):
            data = {}
    data.update(
        {
            "description": description,
            "sd version": sd_version,
            "activation text": activation_text,
            "preferred weight": preferred_weight,
        }
    )
    data.setdefault("negative text", "")
    data.setdefault("notes", "")
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf8") as handle:
            json.dump(data, handle, indent=4, ensure_ascii=False)
        _same_permissions_as(lora_path, Path(temp))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def _same_permissions_as(lora_path: Path, temp: Path) -> None:
    """mkstemp makes the file private (0600): give the sidecar the LoRA's mode, so whoever
    can read the LoRA can read its card's metadata (POSIX only, as for the LoRA itself)."""
    try:
        mode = stat.S_IMODE(os.stat(lora_path).st_mode)
    except OSError:  # no LoRA beside it (a test, or it was moved): what open() would give
        mode = None
    set_usual_permissions(temp, mode)
