"""The tab's pure-Python parts: names, paths, the sidecar, the table and chart."""

from __future__ import annotations

import json
import os
import stat
import types

import pytest

from lib_ckpt2lora.errors import UserError
from lib_ckpt2lora.ui import chart, job, sidecar


def test_default_name_follows_the_variant():
    assert job.default_name("sub/myModel.safetensors [0123456789]", "None", "single", "LoRA") == "myModel"
    assert job.default_name("myModel.safetensors", "other.ckpt", "union", "LoRA") == "myModel_union_other"
    assert job.default_name("myModel.safetensors", "other.ckpt", "single", "LoRA") == "myModel"
    assert job.default_name("myModel.safetensors", None, "single", "Checkpoint (low-rank)") == "myModel_lowrank"
    assert job.default_name("myModel.safetensors", None, "single", "Checkpoint (full delta)") == "myModel_merged"
    assert job.default_name("LoRA: styles/foo", None, "single", "LoRA") == "foo_extracted"
    assert job.default_name(None, None, "single", "LoRA") == ""


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../b", "C:evil", "", "  ", "a|b"])
def test_output_names_stay_inside_the_folder(tmp_path, name):
    with pytest.raises(UserError) as error:
        job.output_path(tmp_path, name)
    assert "\n" not in str(error.value)


def test_output_path_accepts_plain_names_and_subfolders(tmp_path):
    assert job.output_path(tmp_path, "my lora") == tmp_path / "my lora.safetensors"
    assert job.output_path(tmp_path, "my.lora.safetensors") == tmp_path / "my.lora.safetensors"
    assert job.output_path(tmp_path, "styles/x") == tmp_path / "styles" / "x.safetensors"


def test_sd_version_names_per_webui():
    a1111 = types.SimpleNamespace(SdVersion=types.SimpleNamespace(__members__={"Unknown": 1, "SD1": 2, "SD2": 3, "SDXL": 4}))
    neo = types.SimpleNamespace(SD_VERSION=["Unknown", "sd", "xl", "flux", "zit"])
    assert sidecar.sd_version_for("sd15", a1111) == "SD1"
    assert sidecar.sd_version_for("sdxl", a1111) == "SDXL"
    assert sidecar.sd_version_for("zimage", a1111) == "Unknown"
    assert sidecar.sd_version_for("generic", a1111) == "Unknown"
    assert sidecar.sd_version_for("sd15", neo) == "sd"
    assert sidecar.sd_version_for("sdxl", neo) == "xl"
    assert sidecar.sd_version_for("zimage", neo) == "zit"
    full_neo = types.SimpleNamespace(SD_VERSION=["Unknown", "sd", "xl", "flux", "klein", "qwen", "lumina", "zit", "wan", "anima"])
    for architecture, preset in {"flux": "flux", "chroma": "flux", "qwen_image": "qwen", "lumina2": "lumina"}.items():
        assert sidecar.sd_version_for(architecture, full_neo) == preset
    assert sidecar.sd_version_for("flux2", full_neo) == "klein"  # Flux.2: Neo's klein preset
    assert sidecar.sd_version_for("sd15", None) == "SD1"


def test_sidecar_is_written_and_keeps_the_users_keys(tmp_path):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")
    (tmp_path / "x.json").write_text(json.dumps({"notes": "mine", "sd version": "SDXL"}))
    path = sidecar.write_sidecar(lora, sd_version="SD1", description="made here")
    data = json.loads(path.read_text())
    assert path == tmp_path / "x.json"
    assert data["sd version"] == "SD1"
    assert data["preferred weight"] == 1
    assert data["description"] == "made here"
    assert data["notes"] == "mine"
    assert data["activation text"] == ""
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


REPORT = {
    "groups": [
        {
            "level": "IN-1",
            "type": "Attn",
            "auxiliary": False,
            "n": 4,
            "rank": 12.5,
            "s_max": 1.5,
            "s_min": 0.004,
            "ratio": 3.25,
            "energy": 0.953,
        },
        {
            "level": "text_encoder",
            "type": "FF",
            "auxiliary": True,
            "n": 2,
            "rank": 60.0,
            "s_max": 0.5,
            "s_min": 0.1,
            "ratio": 5.0,
            "energy": 0.97,
        },
    ],
    "total": {"n": 6, "rank": 28.3, "energy": 0.959},
}


def test_table_has_the_originals_columns():
    assert chart.COLUMNS == ["Level", "Type", "n", "rank", "S_max", "S_min", "ratio", "energy"]
    rows = chart.table_rows(REPORT)
    assert rows[0] == ["IN-1", "Attn", "4", "12.5", "1.50", "4.0e-03", "3.2x", "95.3%"]
    assert rows[1][0] == "text_encoder"
    assert rows[-1] == ["Total", "ALL", "6", "28.3", "", "", "", "95.9%"]


def test_chart_has_a_bar_and_a_dot_per_group():
    svg = chart.chart_svg(REPORT)
    assert svg.count("class='ckpt2lora-bar'") == 2
    assert svg.count("class='ckpt2lora-dot'") == 2
    assert "IN-1 Attn" in svg and "text_encoder FF" in svg
    assert "<svg" in chart.chart_svg(REPORT) and "No LoRA layers" in chart.chart_svg({"groups": []})


def test_human_size():
    assert chart.human_size(512) == "512 bytes"
    assert chart.human_size(2048) == "2.0 KB"
    assert chart.human_size(5 * 1024 * 1024) == "5.2 MB"  # MB = 10^6 bytes, as the Target size field


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600])
def test_sidecar_gets_the_loras_permissions(tmp_path, mode):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"\0")
    os.chmod(lora, mode)
    written = sidecar.write_sidecar(lora, sd_version="SD1", description="d")
    assert stat.S_IMODE(written.stat().st_mode) == mode
