"""The stub WebUI holds only names the real WebUIs have.

Each name below was read in AUTOMATIC1111 1.10.1 (``modules/...``,
``extensions-builtin/Lora/...``), lllyasviel's Forge and Forge Neo
(``extensions-builtin/sd_forge_lora/...``); exceptions are noted. A stub name missing
from this list fails the test: check it against the real sources before adding it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STUB = HERE / "stub_modules"

VERIFIED = {
    "modules/call_queue.py": {"queue_lock", "wrap_gradio_gpu_call", "wrap_gradio_call"},
    "modules/paths.py": {"models_path", "script_path"},  # re-exported from paths_internal
    "modules/progress.py": {
        "current_task",
        "pending_tasks",
        "finished_tasks",
        "recorded_results",
        "start_task",
        "finish_task",
        "record_results",
        "add_task_to_queue",
    },
    "modules/script_callbacks.py": {"callback_map", "on_ui_tabs", "ui_tabs_callback"},
    "modules/script_loading.py": {"loaded_scripts", "load_module"},
    "modules/sd_models.py": {
        "model_dir",
        "model_path",
        "checkpoints_list",
        "checkpoint_aliases",
        "CheckpointInfo",
        "checkpoint_tiles",
        "list_models",
        "re_strip_checksum",
        "get_closet_checkpoint_match",
        "unload_model_weights",
    },
    "modules/shared.py": {"cmd_opts", "state", "opts"},  # state / opts are set by shared_init.initialize()
    # Compare: A1111 1.10 and Neo @3df257a (Processed(p, images_list, seed=-1, info="", ...)).
    "modules/processing.py": {"StableDiffusionProcessingTxt2Img", "Processed", "process_images"},
    "modules/shared_state.py": {"State"},
    "modules/ui_components.py": {"FormComponent", "ToolButton"},
    "networks.py": {"available_networks", "available_network_aliases", "list_available_networks"},
    "network.py": {"SdVersion", "NetworkOnDisk"},  # SdVersion: A1111 and lllyasviel Forge, not Neo
    "../stub_neo/network.py": {"SD_VERSION", "NetworkOnDisk"},  # Forge Neo
    # Forge Neo's own listing (--ckpt-dirs + models/Stable-diffusion, checkpoint_tiles -> names)
    "../stub_neo/sd_models.py": {
        "model_dir",
        "model_path",
        "checkpoints_list",
        "checkpoint_aliases",
        "CheckpointInfo",
        "checkpoint_tiles",
        "list_models",
        "re_strip_checksum",
        "get_closet_checkpoint_match",
        "unload_model_weights",
    },
}

ATTRIBUTES = {  # names used on objects, each present in all three WebUIs unless noted
    "State": {"skipped", "interrupted", "stopping_generation", "job", "job_no", "job_count", "sampling_step",
              "sampling_steps", "textinfo", "time_start", "interrupt", "stop_generating", "begin", "end"},
    # dataclass fields of StableDiffusionProcessing(Txt2Img), and close()
    "StableDiffusionProcessingTxt2Img": {"prompt", "negative_prompt", "seed", "steps", "width", "height", "cfg_scale",
                                         "sampler_name", "scheduler", "n_iter", "batch_size", "do_not_save_samples",
                                         "do_not_save_grid", "override_settings",
                                         "override_settings_restore_afterwards", "sd_model_name",
                                         "extra_network_data", "close"},
    "Processed": {"images", "prompt", "seed", "info", "sd_model_name"},
    "CheckpointInfo": {"filename", "name", "name_for_extra", "model_name", "sha256", "shorthash", "title",
                       "short_title", "ids", "register"},
    "NetworkOnDisk": {"name", "filename", "alias"},
    "SdVersion": {"Unknown", "SD1", "SD2", "SDXL"},  # A1111 (lllyasviel Forge adds Flux)
    "cmd_opts": {"lora_dir", "ckpt_dir"},  # ckpt_dir: A1111 / lllyasviel Forge (Neo has ckpt_dirs)
    # opts: settings keys of shared_options.py (interrupt_after_current: A1111 default True, Neo
    # False), and Options.data
    "opts": {"interrupt_after_current", "sd_model_checkpoint", "data"},
    "ToolButton": {"get_block_name"},
    "FormComponent": {"get_expected_parent", "webui_do_not_create_gradio_pyi_thank_you"},  # the flag: Forge / Neo
}  # fmt: skip


def top_level_names(path: Path) -> set[str]:
    names = set()
    body = ast.parse(path.read_text()).body
    for node in body + [m for n in body if isinstance(n, ast.If) for m in n.body + n.orelse]:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


def class_members(path: Path, class_name: str) -> set[str]:
    members = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    members.add(item.name)
                elif isinstance(item, ast.Assign):
                    members.update(t.id for t in item.targets if isinstance(t, ast.Name))
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    if isinstance(sub.ctx, ast.Store):
                        members.add(sub.attr)
    return members


def stub_files() -> list[Path]:
    return sorted(STUB.rglob("*.py")) + sorted((HERE / "stub_neo").glob("*.py"))


def key(path: Path) -> str:
    relative = path.relative_to(STUB) if STUB in path.parents else Path("..") / path.relative_to(HERE)
    return relative.as_posix()


@pytest.mark.parametrize("path", stub_files(), ids=key)
def test_stub_module_names_are_real(path):
    if path.name == "__init__.py":
        assert top_level_names(path) == set()
        return
    assert key(path) in VERIFIED, f"{key(path)} is not a module the WebUI has (or not yet verified)"
    assert top_level_names(path) <= VERIFIED[key(path)]


@pytest.mark.parametrize("path", stub_files(), ids=key)
def test_stub_class_members_are_real(path):
    for node in ast.parse(path.read_text()).body + [
        m for n in ast.parse(path.read_text()).body if isinstance(n, ast.If) for m in n.body + n.orelse
    ]:
        if isinstance(node, ast.ClassDef):
            assert node.name in ATTRIBUTES, node.name
            assert class_members(path, node.name) <= ATTRIBUTES[node.name], node.name


def test_stub_cmd_opts_are_real():
    shared = importlib.import_module("modules.shared")
    assert set(vars(shared.cmd_opts)) <= ATTRIBUTES["cmd_opts"]


def test_stub_opts_are_real():
    shared = importlib.import_module("modules.shared")
    assert set(vars(shared.opts)) <= ATTRIBUTES["opts"]


def test_the_tab_uses_only_verified_webui_names():
    """Every ``sd_models.X`` / ``shared.X`` / ... that webui_services.py touches is in the stub."""
    source = (HERE.parents[1] / "lib_ckpt2lora" / "ui" / "webui_services.py").read_text()
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in ("sd_models", "shared", "call_queue", "ui_components", "networks", "processing"):
                used.add((node.value.id, node.attr))
    allowed = {
        "sd_models": VERIFIED["modules/sd_models.py"],
        "shared": VERIFIED["modules/shared.py"],
        "call_queue": VERIFIED["modules/call_queue.py"],
        "ui_components": VERIFIED["modules/ui_components.py"],
        "networks": VERIFIED["networks.py"],
        "processing": VERIFIED["modules/processing.py"],
    }
    unknown = {f"{mod}.{name}" for mod, name in used if name not in allowed[mod]}
    assert not unknown
