"""The ComfyUI node pack (issue 19): ``Ckpt2LoraExtract`` run as ComfyUI runs it.

ComfyUI's modules are stood in for with only the names the node uses, as ComfyUI has them
(yzkee/ComfyUI @783545f6): ``folder_paths.get_filename_list / get_full_path /
get_folder_paths`` (folder_paths.py), ``comfy.model_management.get_torch_device /
processing_interrupted / throw_exception_if_processing_interrupted /
interrupt_current_processing / InterruptProcessingException(BaseException)``
(comfy/model_management.py), ``comfy.utils.ProgressBar(total).update_absolute`` calling the
global hook, and the server's hook that raises the interrupt from inside a progress
update (main.py ``hijack_progress``). The LoRA is applied with ComfyUI's key map and
patching as tests/test_neo_patcher.py emulates them (every patch of a weight kept).
A real ComfyUI run (not in CI): README, "Install in ComfyUI".
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from _bad_inputs import assert_one_sentence, snapshot, temp_leftovers
from safetensors.torch import load_file
from test_neo_patcher import PREFIX, add_patches, load_lora, lora_key_map, patched

from lib_ckpt2lora.comfy import nodes
from lib_ckpt2lora.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- ComfyUI, stood in for ----------------------------------------------------------------------


class Comfy:
    """folder_paths, comfy.model_management and comfy.utils over one models folder."""

    def __init__(self, models: Path):
        self.folders = {
            "checkpoints": [models / "checkpoints"],
            "diffusion_models": [models / "unet", models / "diffusion_models"],
            "loras": [models / "loras"],
        }
        for paths in self.folders.values():
            for path in paths:
                path.mkdir(parents=True, exist_ok=True)
        self.interrupted = False
        self.hook_calls: list[tuple[int, int]] = []
        self.hook = None
        self.device = torch.device("cpu")

    # folder_paths
    def get_folder_paths(self, folder_name: str) -> list[str]:
        return [str(p) for p in self.folders[folder_name]]

    def get_filename_list(self, folder_name: str) -> list[str]:
        names = set()
        for folder in self.folders[folder_name]:
            for path in folder.rglob("*"):
                if path.is_file() and path.suffix in (".safetensors", ".ckpt", ".pt", ".sft"):
                    names.add(os.path.relpath(path, folder))
        return sorted(names)

    def get_full_path(self, folder_name: str, filename: str) -> str | None:
        for folder in self.folders.get(folder_name, []):
            path = folder / filename
            if path.is_file():
                return str(path)
        return None

    # comfy.model_management
    def get_torch_device(self):
        return self.device

    def interrupt_current_processing(self, value: bool = True) -> None:
        self.interrupted = value

    def processing_interrupted(self) -> bool:
        return self.interrupted

    def throw_exception_if_processing_interrupted(self) -> None:
        if self.interrupted:
            self.interrupted = False
            raise self.InterruptProcessingException()

    class InterruptProcessingException(BaseException):
        pass

    def modules(self) -> dict[str, types.ModuleType]:
        folder_paths = types.ModuleType("folder_paths")
        for name in ("get_folder_paths", "get_filename_list", "get_full_path"):
            setattr(folder_paths, name, getattr(self, name))
        mm = types.ModuleType("comfy.model_management")
        for name in (
            "get_torch_device",
            "interrupt_current_processing",
            "processing_interrupted",
            "throw_exception_if_processing_interrupted",
            "InterruptProcessingException",
        ):
            setattr(mm, name, getattr(self, name))
        utils = types.ModuleType("comfy.utils")
        comfy = self

        class ProgressBar:  # comfy/utils.py: the global hook, taken when the bar is made
            def __init__(self, total, node_id=None):
                self.total, self.current, self.hook = total, 0, comfy.hook

            def update_absolute(self, value, total=None, preview=None):
                if total is not None:
                    self.total = total
                self.current = min(value, self.total)
                if self.hook is not None:
                    self.hook(self.current, self.total, preview)

            def update(self, value):
                self.update_absolute(self.current + value)

        utils.ProgressBar = ProgressBar
        package = types.ModuleType("comfy")
        package.__path__ = []
        package.model_management, package.utils = mm, utils
        return {"folder_paths": folder_paths, "comfy": package, "comfy.model_management": mm, "comfy.utils": utils}

    def server_hook(self, value, total, preview):
        """main.py hijack_progress: the interrupt is raised from inside the progress update."""
        self.throw_exception_if_processing_interrupted()
        self.hook_calls.append((value, total))


@pytest.fixture
def comfy(tmp_path, monkeypatch, zimage_pair):
    env = Comfy(tmp_path / "models")
    base, variant = zimage_pair
    shutil.copyfile(base, env.folders["diffusion_models"][1] / "zimage_base.safetensors")
    shutil.copyfile(variant, env.folders["checkpoints"][0] / "zimage_variant.safetensors")
    for name, module in env.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    env.hook = env.server_hook
    return env


@pytest.fixture(scope="module")
def zimage_pair(tmp_path_factory):
    """The demo's Z-Image-layout pair (full-rank noisy deltas, bf16) at the tiny model's
    width, so that ComfyUI's Z-Image key map (test_neo_patcher) applies."""
    from lib_ckpt2lora.demo import make_pair

    config = tm.ZIMAGE_CONFIG
    return make_pair(tmp_path_factory.mktemp("comfy_pair"), dim=config["dim"], blocks=config["n_layers"])


def run(**inputs):
    settings = dict(
        base="zimage_base.safetensors",
        variant="zimage_variant.safetensors",
        output_name="node_lora",
        rank=0,
        rank_thresh=0.95,
        rank_max=64,
    )
    settings.update(inputs)
    return nodes.Ckpt2LoraExtract().extract(**settings)


def loras(comfy: Comfy) -> Path:
    return comfy.folders["loras"][0]


# -- the pack loads as ComfyUI loads it ---------------------------------------------------------


def test_root_loads_as_comfyui_loads_a_node_pack_without_comfyui_torch_or_gradio():
    """nodes.py load_custom_node: spec_from_file_location(<path>, <folder>/__init__.py),
    exec_module, then NODE_CLASS_MAPPINGS. In a fresh Python: nothing of ComfyUI or gradio
    is imported, and the pack imports no module that ``import lib_ckpt2lora`` does not."""
    probe = f"""
import importlib.util, sys
before = set(sys.modules)
import lib_ckpt2lora
library = set(sys.modules) - before
spec = importlib.util.spec_from_file_location({str(ROOT).replace(".", "_x_")!r}, {str(ROOT / "__init__.py")!r})
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
pack = set(sys.modules) - before - library
print(sorted(module.NODE_CLASS_MAPPINGS), module.NODE_DISPLAY_NAME_MAPPINGS)
print(sorted(m for m in pack if not m.startswith(spec.name)))
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"gradio", "comfy", "folder_paths", "nodes", "execution"}}))
print(sorted(m.split(".")[-1] for m in pack if m.startswith(spec.name + ".lib_ckpt2lora.")))
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    mappings, outside, host, own_text = proc.stdout.splitlines()
    own = ast.literal_eval(own_text)
    assert mappings == "['Ckpt2LoraExtract'] {'Ckpt2LoraExtract': 'Extract LoRA (ckpt2lora)'}"
    assert outside == "[]", f"the pack imports modules the library does not: {outside}"
    assert host == "[]", f"ComfyUI or gradio imported at load: {host}"
    assert "nodes" in own  # the pack's own copy of the library, under ComfyUI's module name
    assert not any(name in own for name in ("tab", "job", "chart_image", "services")), f"not lazy: {own}"


def test_the_node_declares_what_issue_19_lists(comfy):
    cls = nodes.NODE_CLASS_MAPPINGS["Ckpt2LoraExtract"]
    assert cls.CATEGORY == "ckpt2lora" and cls.OUTPUT_NODE is True
    assert cls.RETURN_NAMES == ("lora_name", "summary", "chart")
    assert cls.RETURN_TYPES[1:] == ("STRING", "IMAGE")
    # "*" links into LoraLoaderModelOnly's lora_name list (a STRING output cannot: validate_node_input)
    assert cls.RETURN_TYPES[0] == "*"
    types_ = cls.INPUT_TYPES()
    assert list(types_["required"]) == ["base", "variant", "output_name", "rank", "rank_thresh", "rank_max"]
    assert set(types_["optional"]) == {
        "variant2", "union", "alpha", "target_size_mb", "format", "min_dim", "include", "exclude", "save_dtype", "overwrite"
    }  # fmt: skip
    required, optional = types_["required"], types_["optional"]
    assert required["rank"][1]["default"] == 0 and required["rank_thresh"][1]["default"] == 0.95
    assert required["rank_max"][1]["default"] == 64
    assert optional["overwrite"][1]["default"] is False and optional["target_size_mb"][1]["default"] == 0
    assert optional["format"][1]["default"] == "auto"


def test_combo_lists_are_comfyuis_model_folders_and_loras(comfy):
    (comfy.folders["diffusion_models"][0] / "sub").mkdir()
    (comfy.folders["diffusion_models"][0] / "sub" / "old.safetensors").write_bytes(b"x")
    (loras(comfy) / "style.safetensors").write_bytes(b"x")
    (comfy.folders["checkpoints"][0] / "notes.txt").write_text("not a model")
    required, optional = nodes.Ckpt2LoraExtract.INPUT_TYPES().values()
    models = [os.path.join("sub", "old.safetensors"), "zimage_base.safetensors", "zimage_variant.safetensors"]
    assert required["base"][0] == models
    assert required["variant"][0] == models + ["loras/style.safetensors"]
    assert optional["variant2"][0] == ["None"] + models + ["loras/style.safetensors"]


# -- an extraction through the node --------------------------------------------------------------


def comfyui_applies(lora_path: Path, base_path: Path, variant_path: Path) -> dict[str, float]:
    """ComfyUI's key map and patches (every patch kept) on the base; relative error of
    each changed 2-D weight against the variant. Fails on a key no weight takes."""
    base = {PREFIX + k: v.float() for k, v in load_file(str(base_path)).items()}
    variant = {PREFIX + k: v.float() for k, v in load_file(str(variant_path)).items()}
    patches, unused = load_lora(load_file(str(lora_path)), lora_key_map(base))
    assert not unused, f"keys no weight takes: {sorted(unused)[:5]}"
    result = patched(base, add_patches(patches, base, one_per_key=False))
    return {
        key: float((result[key] - variant[key]).norm() / (variant[key] - base[key]).norm())
        for key in base
        if base[key].dim() == 2 and not torch.equal(base[key], variant[key])
    }


def test_the_nodes_lora_applies_exactly_in_comfyui_with_progress(comfy, zimage_pair):
    lora_name, summary, chart = run(rank=256, save_dtype="fp32", min_dim=1)["result"]  # every layer at full rank
    out = loras(comfy) / "node_lora.safetensors"
    assert lora_name == "node_lora.safetensors" and out.is_file()
    assert lora_name in comfy.get_filename_list("loras")  # what LoraLoaderModelOnly lists
    errors = comfyui_applies(out, *zimage_pair)
    assert len(errors) >= 6 * 6, sorted(errors)  # every block's qkv/out/w1/w2/w3/adaLN and more
    bad = {key: err for key, err in errors.items() if err > TOLERANCE}
    assert not bad, f"weights not given their whole delta: {bad}"
    assert "LoRA Summary" in summary and "Total" in summary
    # progress: one bar, increasing, ending at its total, through ComfyUI's hook
    values = [value for value, _ in comfy.hook_calls]
    totals = {total for _, total in comfy.hook_calls}
    assert len(totals) == 1 and values == sorted(values) and values[-1] == totals.pop() > 10
    # the chart: ComfyUI's IMAGE, [1, H, W, 3] float in 0..1, with something drawn on it
    assert chart.dtype == torch.float32 and chart.dim() == 4 and chart.shape[0] == 1 and chart.shape[3] == 3
    assert 0.0 <= float(chart.min()) < float(chart.max()) <= 1.0


def test_the_automatic_rank_lora_is_smaller_and_still_applies(comfy, zimage_pair):
    """The defaults (rank 0 = automatic, 95% energy, cap 64): every written key lands."""
    lora_name, _, _ = run(output_name="auto")["result"]
    errors = comfyui_applies(loras(comfy) / lora_name, *zimage_pair)
    assert errors and max(errors.values()) < 0.5


def test_existing_output_needs_overwrite(comfy):
    target = loras(comfy) / "node_lora.safetensors"
    target.write_bytes(b"an older LoRA")
    with pytest.raises(UserError) as caught:
        run(rank=4)
    message = str(caught.value)
    assert_one_sentence(message)
    assert "already exists" in message and "'overwrite'" in message and "--" not in message
    assert target.read_bytes() == b"an older LoRA" and not temp_leftovers(loras(comfy))
    lora_name, _, _ = run(rank=4, overwrite=True)["result"]
    assert lora_name == "node_lora.safetensors" and len(load_file(str(target))) > 0


# -- interrupt -----------------------------------------------------------------------------------


def press_cancel_at(comfy: Comfy, call: int, raise_in_hook: bool) -> None:
    """Cancel pressed during the ``call``-th progress update; the server's hook raises it
    there (main.py), or, without that hook, the library sees it between layers."""
    calls = []

    def hook(value, total, preview):
        calls.append(value)
        if len(calls) == call:
            comfy.interrupt_current_processing(True)
        if raise_in_hook:
            comfy.throw_exception_if_processing_interrupted()

    comfy.hook = hook


@pytest.mark.parametrize(
    "raise_in_hook, inputs",
    [(True, {}), (False, {}), (True, {"target_size_mb": 0.05})],
    ids=["raised-inside-ProgressBar.update", "seen-between-layers", "raised-inside-update-with-a-size-budget"],
)
def test_interrupt_ends_as_comfyuis_interrupt_with_nothing_written(comfy, raise_in_hook, inputs):
    before = snapshot(loras(comfy))
    press_cancel_at(comfy, 3, raise_in_hook)
    with pytest.raises(comfy.InterruptProcessingException):
        run(**inputs)
    assert snapshot(loras(comfy)) == before and not temp_leftovers(loras(comfy))
    assert comfy.interrupted is False  # cleared, as ComfyUI's own interrupt handling leaves it
    comfy.hook = comfy.server_hook
    assert run()["result"][0] == "node_lora.safetensors"  # the next run works


# -- bad input: one sentence, nothing written ----------------------------------------------------


@pytest.mark.parametrize(
    "inputs, mentions",
    [
        (dict(variant="zimage_base.safetensors"), ["same file", "zimage_base"]),
        (dict(base="loras/style.safetensors"), ["base", "not a LoRA"]),
        (dict(variant="gone.safetensors"), ["gone.safetensors", "no longer"]),
        (dict(variant="sd15.safetensors"), ["zimage_base", "sd15"]),
        (dict(output_name="../escape"), ["inside the output folder"]),
        (dict(union=True), ["'union'", "'variant2'"]),
        (dict(rank=8, target_size_mb=5.0), ["'target_size_mb'", "'rank'"]),
    ],
    ids=["same-file-twice", "lora-as-base", "file-gone", "unknown-pair", "name-leaves-folder", "union-alone", "size-and-rank"],
)
def test_bad_input_fails_the_node_with_one_sentence_and_writes_nothing(comfy, inputs, mentions):
    from _bad_inputs import sd15_like

    sd15_like(comfy.folders["checkpoints"][0] / "sd15.safetensors")
    (loras(comfy) / "style.safetensors").write_bytes(b"x")
    before = snapshot(comfy.folders["loras"][0].parent)
    with pytest.raises(UserError) as caught:
        run(**inputs)
    message = str(caught.value)
    assert_one_sentence(message)
    assert all(text in message for text in mentions), message
    assert "--" not in message, f"a CLI flag in the node's message: {message}"
    assert snapshot(comfy.folders["loras"][0].parent) == before


def test_library_sentences_name_the_nodes_inputs():
    assert nodes.node_text("choose another name or pass --overwrite.") == "choose another name or turn on 'overwrite'."
    assert nodes.node_text("--target-size 5MB with --rank-thresh") == "'target_size_mb' 5MB with 'rank_thresh'"
    assert nodes.node_text("Give the output file with --out.") == "Give the output file with 'output_name'."


@pytest.mark.parametrize(
    "device, expected",
    [("cpu", "cpu"), ("cuda:1", "cuda:1"), ("mps", "mps"), ("xpu:0", "cpu"), (None, "cpu")],
)
def test_compute_device_is_comfyuis_with_the_cpu_fallback(comfy, device, expected):
    if device is None:

        def broken():
            raise RuntimeError("no device")

        sys.modules["comfy.model_management"].get_torch_device = broken
    elif device.startswith(("cuda", "xpu")):
        comfy.device = types.SimpleNamespace(type=device.split(":")[0], index=int(device.split(":")[1]))
    else:
        comfy.device = torch.device(device)
    assert nodes.compute_device() == expected


# -- the example workflow ------------------------------------------------------------------------


def test_example_workflow_extracts_then_samples_variant_and_base_plus_lora_with_one_seed(comfy):
    """example_workflows/ (ComfyUI lists it under the pack's templates: app/custom_node_manager.py):
    a consistent graph in the UI format 0.4 whose extract node carries this node's widgets in
    INPUT_TYPES order, whose LoRA loader takes the extracted file by link, and whose two
    samplers share one seed node (run against a real ComfyUI's /object_info: docs in the note)."""
    import json

    workflow = json.loads((ROOT / "example_workflows" / "extract_and_compare.json").read_text(encoding="utf8"))
    assert workflow["version"] == 0.4
    by_id = {node["id"]: node for node in workflow["nodes"]}
    assert len(by_id) == len(workflow["nodes"]) and workflow["last_node_id"] == max(by_id)
    origin_of = {}
    for link_id, origin, slot, target, target_slot, _ in workflow["links"]:
        assert link_id in by_id[origin]["outputs"][slot]["links"]
        assert by_id[target]["inputs"][target_slot]["link"] == link_id
        origin_of[(target, by_id[target]["inputs"][target_slot]["name"])] = (by_id[origin], slot)

    extract = next(node for node in workflow["nodes"] if node["type"] == "Ckpt2LoraExtract")
    spec = nodes.Ckpt2LoraExtract.INPUT_TYPES()
    names = list(spec["required"]) + list(spec["optional"])
    values = dict(zip(names, extract["widgets_values"], strict=True))
    for name, definition in {**spec["required"], **spec["optional"]}.items():
        if name not in ("base", "variant", "output_name"):
            assert values[name] == definition[1].get("default", "None"), name

    loader = next(node for node in workflow["nodes"] if node["type"] == "LoraLoader")
    assert origin_of[(loader["id"], "lora_name")] == (extract, 0)
    base_loader, _ = origin_of[(loader["id"], "model")]
    samplers = [node for node in workflow["nodes"] if node["type"] == "KSampler"]
    assert len(samplers) == 2
    seeds = {(origin["id"], slot) for origin, slot in (origin_of[(s["id"], "seed")] for s in samplers)}
    assert len(seeds) == 1, "the two samplers must share one seed"
    models = {origin_of[(s["id"], "model")][0]["id"] for s in samplers}
    variant_loader = next(by_id[m] for m in models if m != loader["id"])
    assert models == {loader["id"], variant_loader["id"]}
    assert base_loader["widgets_values"] == [values["base"]] and variant_loader["widgets_values"] == [values["variant"]]
