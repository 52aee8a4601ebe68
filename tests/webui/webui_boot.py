"""Start the stub WebUI in a clean process the way A1111 1.10 starts an extension.

    python webui_boot.py WORKDIR  ->  prints one JSON line with what happened

As in ``modules/scripts.py``: the extension's root is put first on sys.path only while
``scripts/ckpt2lora.py`` is executed by ``script_loading.load_module`` (not registered in
sys.modules); then ``script_callbacks.ui_tabs_callback()`` builds the tabs, which are
rendered into the main Blocks inside ``gr.Tabs`` (as ``ui.create_ui`` does). Then the
Extract event runs through gradio's processing on tiny SD1.5-layout checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def boot(workdir: Path):
    """Stub WebUI with two SD1.5-layout checkpoints; the extension loaded A1111's way.

    Returns (facts, interfaces) where interfaces is what ``ui_tabs_callback`` returned.
    """
    os.environ["CKPT2LORA_STUB_ROOT"] = str(workdir)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    sys.path.insert(0, str(HERE / "stub_modules"))
    try:
        import gradio.component_meta

        gradio.component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    except ImportError:
        pass
    import networks
    from modules import script_callbacks, script_loading, sd_models
    from uihelpers import write_pair

    write_pair(Path(sd_models.model_path), "sd15_base.safetensors", "sd15_finetune.safetensors")
    sd_models.list_models()
    networks.list_available_networks()
    found_before = importlib.util.find_spec("lib_ckpt2lora") is not None

    saved = sys.path
    try:
        sys.path = [str(ROOT)] + sys.path
        script_loading.load_module(str(ROOT / "scripts" / "ckpt2lora.py"))
    finally:
        sys.path = saved
    root_on_path_after = any(Path(p or ".").resolve() == ROOT for p in sys.path)
    facts = {"lib_importable_before": found_before, "root_on_path_after": root_on_path_after}
    return facts, script_callbacks.ui_tabs_callback()


def main(workdir: Path) -> dict:
    import gradio as gr

    facts, interfaces = boot(workdir)
    import networks
    from modules import shared
    from uihelpers import run_event

    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tabs(elem_id="tabs"):
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    config = demo.get_config_file()
    elem_ids = sorted({c.get("props", {}).get("elem_id") for c in config["components"]} - {None})

    tab = interfaces[0][0].ckpt2lora
    titles = tab.services.list_checkpoints()
    base = next(t for t in titles if t.startswith("sd15_base"))
    variant = next(t for t in titles if t.startswith("sd15_finetune"))
    from lib_ckpt2lora.ui import job

    values = dict(vars(job.Form()))
    values.update(base=base, variant=variant, name=job.default_name(variant, None, "single", "LoRA"))
    data = run_event(demo, tab.handler, ["task(boot)"] + [values[f] for f in job.FORM_FIELDS])
    lora = Path(shared.cmd_opts.lora_dir) / "sd15_finetune.safetensors"
    sidecar = lora.with_suffix(".json")
    return {
        **facts,
        "tabs": [(label, ifid) for _, label, ifid in interfaces],
        "elem_ids": elem_ids,
        "titles": titles,
        "status": data[-1],
        "result_name": data[4],
        "lora_exists": lora.is_file(),
        "sidecar": json.loads(sidecar.read_text()) if sidecar.is_file() else None,
        "networks": sorted(networks.available_networks),
        "variant_choices": run_event(demo, tab.refresh_choices, [])[1].get("choices"),
        "lora_dir_files": sorted(p.name for p in lora.parent.iterdir()),
    }


if __name__ == "__main__":
    print("BOOT-RESULT " + json.dumps(main(Path(sys.argv[1])), default=str))
