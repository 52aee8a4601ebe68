"""Checks shared by the loader tests: run the engine on tiny models, load its LoRA with a
real loader, and compare every weight the loader ended up with against the variant.

The rule every check applies: a weight the engine wrote a LoRA for must come out of the
loader equal to the variant's (relative error of the delta below ``DELTA_TOLERANCE``);
every other weight must come out untouched (bit-equal to the base). A loader that drops
keys usually only logs a warning, so the loaders' warnings are captured and any about
keys fails the test, and the modules a loader injected are counted against the modules
in the file.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import tiny_models as tm
import torch
from safetensors.torch import load_file

import lib_ckpt2lora
from lib_ckpt2lora import ExtractOptions

DELTA_TOLERANCE = 1e-3
LORA_SUFFIXES = (
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_mid.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".alpha",
    ".diff",
    ".diff_b",
)


@dataclass
class Pair:
    """Base and variant of one tiny model: their component state dicts and files."""

    model: tm.TinyModel
    base: dict[str, dict[str, torch.Tensor]]
    variant: dict[str, dict[str, torch.Tensor]]
    base_path: Path
    variant_path: Path


def make_pair(model: tm.TinyModel, folder: Path, **layout) -> Pair:
    base = model.states()
    variant = tm.variant_states(base)
    folder.mkdir(parents=True, exist_ok=True)
    base_path = tm.save(tm.checkpoint_for(model, base, **layout), folder / "base.safetensors")
    variant_path = tm.save(tm.checkpoint_for(model, variant, **layout), folder / "variant.safetensors")
    return Pair(model, base, variant, base_path, variant_path)


def run_extract(base: Path, variant: Path, out: Path, **options):
    """The engine on every layer (min_dim=1), fp32 factors, a rank that holds the delta."""
    settings = dict(min_dim=1, save_dtype="fp32", rank=0, rank_thresh=0.9999, overwrite=True)
    settings.update(options)
    # The documented entry point, called as users call it (test_public_api.py keeps it a function).
    return lib_ckpt2lora.extract(ExtractOptions(base=base, variant=variant, out=out, **settings), log=lambda line: None)


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block (see the ``one_torch_thread`` fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Case:
    """A tiny model pair and the engine's LoRA for it (default format, every layer)."""

    pair: Pair
    result: object
    lora_path: Path


def build_case(architecture: str, folder: Path) -> Case:
    factory = {"zimage": tm.zimage_model, "sd15": tm.sd15_model, "sdxl": tm.sdxl_model}[architecture]
    with one_thread():
        pair = make_pair(factory(seed=0), folder)
        out = folder / "lora.safetensors"
        result = run_extract(pair.base_path, pair.variant_path, out)
    assert result.architecture == architecture
    return Case(pair, result, out)


def lora_module_names(lora: dict[str, torch.Tensor]) -> set[str]:
    names = set()
    for key in lora:
        for suffix in LORA_SUFFIXES:
            if key.endswith(suffix):
                names.add(key[: -len(suffix)])
                break
        else:
            raise AssertionError(f"LoRA key {key} has no known suffix")
    return names


def check_report_matches_file(result, lora_path: Path) -> dict[str, torch.Tensor]:
    """The report's layers are exactly the modules in the file; returns the file's tensors."""
    lora = load_file(str(lora_path))
    modules = lora_module_names(lora)
    reported = {layer.name for layer in result.report.layers}
    assert modules == reported, (
        f"file vs report: only in file {sorted(modules - reported)[:5]}, only in report {sorted(reported - modules)[:5]}"
    )
    return lora


def written_params(model: tm.TinyModel, result) -> dict[str, set[str]]:
    """component -> the diffusers parameter names the engine wrote a LoRA for."""
    out: dict[str, set[str]] = {}
    for layer in result.report.layers:
        assert layer.key in model.canonical, f"the engine wrote {layer.name} for {layer.key}, a key the tiny model lacks"
        component, param = model.canonical[layer.key]
        out.setdefault(component, set()).add(param)
    return out


def assert_coverage(pair: Pair, written: dict[str, set[str]], exempt: tuple[str, ...]) -> None:
    """Every >=2-D weight the variant changed is in the LoRA, except names containing ``exempt``
    (embeddings and raw matrices no LoRA format can address)."""
    missing = []
    for component, state in pair.base.items():
        for name, base in state.items():
            if base.ndim < 2 or not base.dtype.is_floating_point or any(part in name for part in exempt):
                continue
            if name not in written.get(component, set()):
                missing.append(f"{component}.{name}")
    assert not missing, f"{len(missing)} changed weights have no LoRA module, e.g. {missing[:6]}"


def assert_weights(
    pair: Pair, loaded: dict[str, dict[str, torch.Tensor]], written: dict[str, set[str]], loader: str, complete: bool = True
) -> int:
    """Written weights equal the variant's, all others the base's. Returns how many LoRA'd
    weights were checked. ``complete``: ``loaded`` must hold every parameter of each component."""
    errors = []
    checked = 0
    for component, names in loaded.items():
        base_state, variant_state = pair.base[component], pair.variant[component]
        if complete:
            assert set(names) == set(base_state), f"{loader}: {component} parameter names changed after loading"
        for name, value in names.items():
            base, variant = base_state[name].float(), variant_state[name].float()
            if name in written.get(component, set()):
                delta_norm = float(torch.linalg.vector_norm(variant - base))
                error = float(torch.linalg.vector_norm(value.float() - variant)) / delta_norm
                if not error < DELTA_TOLERANCE:
                    errors.append(f"{component}.{name}: relative delta error {error:.3g}")
                checked += 1
            elif not torch.equal(value.float(), base):
                change = float(torch.linalg.vector_norm(value.float() - base))
                errors.append(f"{component}.{name}: not in the LoRA but changed by {change:.3g}")
    missed = {c: names - set(loaded.get(c, {})) for c, names in written.items()}
    missed = [f"{c}.{n}" for c, names in missed.items() for n in sorted(names)]
    assert not missed, f"{loader}: weights the LoRA targets are not in the loaded model: {missed[:6]}"
    assert not errors, f"{loader}: {len(errors)} wrong weights, e.g. " + "; ".join(errors[:6])
    return checked


def lora_reachable_states(pair: Pair, written: dict[str, set[str]]) -> dict[str, dict[str, torch.Tensor]]:
    """The variant where the LoRA reaches (the weights it was written for), the base elsewhere:
    what a model with the LoRA applied must compute (the pad tokens, norms and embeddings the
    variant also changed are out of any LoRA's reach)."""
    return {
        component: {k: (pair.variant[component][k] if k in written.get(component, set()) else v) for k, v in state.items()}
        for component, state in pair.base.items()
    }


def relative_output_error(with_lora: torch.Tensor, variant: torch.Tensor, base: torch.Tensor) -> float:
    """||out_lora - out_variant|| / ||out_variant - out_base||: 0 when the LoRA reproduces the variant."""
    return float(torch.linalg.vector_norm(with_lora - variant) / torch.linalg.vector_norm(variant - base))


# -- diffusers -----------------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def loader_messages():
    """Collect WARNING+ log records of diffusers/peft/transformers/lycoris and Python warnings."""
    handler = _ListHandler()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers", "lycoris", "LyCORIS")]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield handler.messages
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            handler.messages.extend(f"warning: {w.category.__name__}: {w.message}" for w in caught)


def key_complaints(messages: list[str]) -> list[str]:
    """Messages that say a LoRA key was not used (the way loaders drop keys silently)."""
    words = ("unexpected", "missing", "not found", "unused", "could not", "ignored", "not correctly", "no lora keys")
    return [m for m in messages if any(word in m.lower() for word in words)]


def peft_modules(module: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, sub in module.named_modules() if isinstance(sub, LoraLayer)}


def clean_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict with peft's wrapping undone (``base_layer.``) and LoRA factors dropped."""
    out = {}
    for key, value in module.state_dict().items():
        if ".lora_" in key or "lora_magnitude" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().clone()
    return out


def module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def diffusers_load(pipeline, lora_path: Path, components: dict[str, torch.nn.Module]):
    """``pipeline.load_lora_weights(path)``; returns (loader messages, injected modules per component)."""
    with loader_messages() as messages:
        pipeline.load_lora_weights(str(lora_path))
    injected = {name: peft_modules(module) for name, module in components.items()}
    return messages, injected


def assert_injected(injected: dict[str, set[str]], written: dict[str, set[str]], lora_modules: int, loader: str) -> None:
    """Each module the LoRA targets got a LoRA layer, and nothing else did."""
    expected = {component: {module_of(p) for p in params} for component, params in written.items()}
    for component in set(injected) | set(expected):
        got, want = injected.get(component, set()), expected.get(component, set())
        assert got == want, (
            f"{loader}: {component}: {len(want - got)} LoRA modules not injected, e.g. {sorted(want - got)[:5]}; "
            f"{len(got - want)} unexpected, e.g. {sorted(got - want)[:5]}"
        )
    total = sum(len(modules) for modules in injected.values())
    assert total == lora_modules, f"{loader}: injected {total} LoRA layers for {lora_modules} modules in the file"


# -- LyCORIS -------------------------------------------------------------------------------


class TextModelWrapper(torch.nn.Module):
    """transformers 4's CLIPTextModel layout (``text_model.encoder...``) around a transformers 5
    one (``encoder...``): what kohya names (``lora_te_text_model_...``) and LyCORIS expect."""

    def __init__(self, text_model: torch.nn.Module):
        super().__init__()
        self.text_model = text_model


def lycoris_merge(lora: dict[str, torch.Tensor], targets: dict[str, torch.nn.Module]):
    """Merge a kohya-named LoRA with LyCORIS: ``create_lycoris_from_weights`` per kohya prefix
    (``lora_unet``, ``lora_te``, ``lora_te1``, ``lora_te2``) on that component, then ``merge_to``.

    LyCORIS matches ``<prefix>_<module path with _>`` against ``named_modules()`` and silently
    skips keys that match nothing, so this returns the matched module names for counting, with
    the loader's messages. (``lycoris.kohya.create_network_from_weights`` does the same per
    prefix but first builds a full network, which asserts on a diffusers UNet: its
    ``TimestepEmbedding`` target class and its ``time_embedding.linear_1`` target name give
    the same module twice.)
    """
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    matched: set[str] = set()
    previous = LycorisNetwork.LORA_PREFIX
    try:
        with loader_messages() as messages:
            for prefix, module in targets.items():
                LycorisNetwork.LORA_PREFIX = prefix
                part = {k: v for k, v in lora.items() if k.startswith(prefix + "_")}
                network, _ = create_lycoris_from_weights(1.0, None, module, weights_sd=part)
                matched |= {m.lora_name for m in network.loras}
                network.merge_to(1.0)
    finally:
        LycorisNetwork.LORA_PREFIX = previous
    return matched, messages
