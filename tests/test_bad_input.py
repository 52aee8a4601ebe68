"""Bad inputs (issue #6): damaged files, pickles that would run code, pairs that do not belong
together, and a battery of odd inputs the tool was not written for.

Every case checks the CLI in a subprocess (exit 2, one sentence naming the file or key, no
traceback, the output folder exactly as it was) and the library (``UserError``, nothing
written). The subprocess runs of one module go at once (see ``cli_runs``): each spends most
of its time importing torch.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from _bad_inputs import (
    IS_ROOT,
    assert_clean_failure,
    assert_one_sentence,
    assert_success,
    copy,
    describe,
    edit_header,
    join_safetensors,
    load_state,
    one_torch_thread,
    out_folder,
    permission_bits_prefix,
    run_cli,
    run_cli_inprocess,
    run_cli_many,
    save_state,
    sd15_like,
    small_pair,
    snapshot,
    split_safetensors,
    temp_leftovers,
    tiny_safetensors_bytes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_ckpt2lora.errors import UserError
from lib_ckpt2lora.extract import extract
from lib_ckpt2lora.options import ExtractOptions
from lib_ckpt2lora.reading import TensorFile

KEY = "layers.0.feed_forward.w1.weight"  # a weight of the demo pair, in file and canonical spelling
OTHER_KEY = "layers.0.attention.out.weight"  # canonical: layers.0.attention.to_out.0.weight
LORA_MODULE = "diffusion_model.layers.0.feed_forward.w1"


@dataclass
class Work:
    root: Path
    base: Path
    variant: Path
    inputs: Path = field(init=False)

    def __post_init__(self):
        self.inputs = self.root / "inputs"
        self.inputs.mkdir(exist_ok=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    base, variant = small_pair(tmp_path_factory.getbasetemp())
    return Work(tmp_path_factory.mktemp("bad_input"), base, variant)



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield

def quiet(_message: str) -> None:
    pass


# -- damaged model files ---------------------------------------------------------------------
# name -> builder(work) -> path of the damaged file; each is tried as the variant (base good).
DAMAGED: dict[str, Callable[[Work], Path]] = {}


def damaged(name: str):
    def register(builder):
        DAMAGED[name] = builder
        return builder

    return register


def _target(w: Work, name: str) -> Path:
    return w.inputs / f"{name}.safetensors"


@damaged("missing")
def _missing(w):
    return w.inputs / "does_not_exist.safetensors"


@damaged("directory")
def _directory(w):
    path = w.inputs / "a_folder.safetensors"
    path.mkdir(exist_ok=True)
    return path


@damaged("empty")
def _empty(w):
    path = _target(w, "empty")
    path.write_bytes(b"")
    return path


@damaged("five_bytes")
def _five_bytes(w):
    path = _target(w, "five_bytes")
    path.write_bytes(b"\x01\x02\x03\x04\x05")
    return path


@damaged("truncated_half")
def _truncated_half(w):
    raw = w.variant.read_bytes()
    path = _target(w, "truncated_half")
    path.write_bytes(raw[: len(raw) // 2])
    return path


@damaged("truncated_in_header")
def _truncated_in_header(w):
    path = _target(w, "truncated_in_header")
    path.write_bytes(w.variant.read_bytes()[:100])
    return path


@damaged("garbage_header")
def _garbage_header(w):
    junk = bytes((i * 37 + 11) % 256 for i in range(400))
    path = _target(w, "garbage_header")
    path.write_bytes(join_safetensors(junk, b"\0" * 64))
    return path


@damaged("header_not_utf8")
def _header_not_utf8(w):
    path = _target(w, "header_not_utf8")
    path.write_bytes(join_safetensors(b'{"\xff\xfe": 1}', b"\0" * 16))
    return path


@damaged("header_length_huge")
def _header_length_huge(w):
    raw = w.variant.read_bytes()
    path = _target(w, "header_length_huge")
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    return path


@damaged("header_length_past_end")
def _header_length_past_end(w):
    raw = w.variant.read_bytes()
    path = _target(w, "header_length_past_end")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return path


def _set(key: str, field_name: str, value) -> Callable[[dict], None]:
    def change(header: dict) -> None:
        header[key][field_name] = value

    return change


@damaged("offsets_past_end")
def _offsets_past_end(w):
    header, data = split_safetensors(w.variant.read_bytes())
    begin, end = header[KEY]["data_offsets"]
    return edit_header(w.variant, _target(w, "offsets_past_end"), _set(KEY, "data_offsets", [begin + len(data), end + len(data)]))


@damaged("negative_offsets")
def _negative_offsets(w):
    header, _ = split_safetensors(w.variant.read_bytes())
    begin, end = header[KEY]["data_offsets"]
    return edit_header(w.variant, _target(w, "negative_offsets"), _set(KEY, "data_offsets", [begin - 10**6, end]))


@damaged("huge_shape_tiny_data")
def _huge_shape(w):
    return edit_header(w.variant, _target(w, "huge_shape_tiny_data"), _set(KEY, "shape", [2**31, 2**31]))


@damaged("dtype_F8_E8M0")
def _dtype_f8_e8m0(w):
    return edit_header(w.variant, _target(w, "dtype_F8_E8M0"), _set(KEY, "dtype", "F8_E8M0"))


@damaged("dtype_C64")
def _dtype_c64(w):
    return edit_header(w.variant, _target(w, "dtype_C64"), _set(KEY, "dtype", "C64"))


@damaged("dtype_made_up")
def _dtype_made_up(w):
    return edit_header(w.variant, _target(w, "dtype_made_up"), _set(KEY, "dtype", "Q4_K_M"))


@damaged("header_not_a_dict")
def _not_a_dict(w):
    return edit_header(w.variant, _target(w, "header_not_a_dict"), lambda header: list(header))


@damaged("no_tensors")
def _no_tensors(w):
    return edit_header(w.variant, _target(w, "no_tensors"), lambda header: {"__metadata__": {"a": "b"}}, data=b"")


@damaged("entry_missing_dtype")
def _entry_missing_dtype(w):
    return edit_header(w.variant, _target(w, "entry_missing_dtype"), lambda header: header[KEY].pop("dtype") and None)


# The three below raised OverflowError / TypeError / RecursionError (a traceback) when written.
@damaged("shape_infinity")
def _shape_infinity(w):
    # Python's json reads the bare word Infinity (safetensors' own reader would not).
    return edit_header(w.variant, _target(w, "shape_infinity"), _set(KEY, "shape", [math.inf, 64]))


@damaged("dtype_a_list")
def _dtype_a_list(w):
    return edit_header(w.variant, _target(w, "dtype_a_list"), _set(KEY, "dtype", ["BF16"]))


@damaged("header_deeply_nested")
def _deeply_nested(w):
    path = _target(w, "header_deeply_nested")
    path.write_bytes(join_safetensors(b"[" * 100_000 + b"]" * 100_000, b""))
    return path


# What the message must name besides the file, for some cases.
DAMAGED_MENTIONS = {
    "offsets_past_end": [KEY],
    "negative_offsets": [KEY],
    "huge_shape_tiny_data": [KEY],
    "dtype_F8_E8M0": [KEY, "F8_E8M0"],
    "dtype_C64": [KEY, "C64"],
    "dtype_made_up": [KEY, "Q4_K_M"],
    "entry_missing_dtype": [KEY],
    "shape_infinity": [KEY],
    "dtype_a_list": [KEY],
}
# Damaged files also tried as the base.
DAMAGED_AS_BASE = ("missing", "truncated_half", "garbage_header", "dtype_C64")


# -- pickles ---------------------------------------------------------------------------------
class RunsCode:
    """Pickles as a call of ``func(*args)``: unpickling it without weights_only runs it."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _tensors(w: Work) -> dict[str, torch.Tensor]:
    return load_state(w.base)


PAYLOADS: dict[str, Callable[[Work, Path, Path], None]] = {}


def payload(name: str):
    def register(builder):
        PAYLOADS[name] = builder
        return builder

    return register


@payload("raw_pickle_os_system.ckpt")
def _raw_os_system(w, path, marker):
    path.write_bytes(pickle.dumps(RunsCode(os.system, f"touch {marker}")))


@payload("zip_torch_save_builtin_open.pt")
def _zip_open(w, path, marker):
    torch.save({"state_dict": _tensors(w), "hook": RunsCode(builtins.open, str(marker), "w")}, str(path))


@payload("legacy_torch_save_eval.ckpt")
def _legacy_eval(w, path, marker):
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    torch.save({"state_dict": _tensors(w), "x": RunsCode(builtins.eval, code)}, str(path), _use_new_zipfile_serialization=False)


def build_payload(w: Work, name: str) -> tuple[Path, Path]:
    path = w.inputs / name
    marker = w.inputs / f"marker_{name}"
    PAYLOADS[name](w, path, marker)
    return path, marker


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payloads_are_armed(work, name, tmp_path):
    """Control: each crafted pickle really runs its code when loaded the unsafe way."""
    path, marker = tmp_path / name, tmp_path / "armed"
    PAYLOADS[name](work, path, marker)
    if name.startswith("raw_pickle"):
        pickle.loads(path.read_bytes())
    else:
        loaded = torch.load(str(path), weights_only=False)
        if hasattr(loaded.get("hook"), "close"):
            loaded["hook"].close()  # the file builtins.open created
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about our raw pickle
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_pickle_payload_refused_by_library(work, name, tmp_path):
    path, marker = build_payload(work, name)
    path_copy = tmp_path / name
    shutil.copyfile(path, path_copy)
    with pytest.raises(UserError) as caught:
        TensorFile(path_copy, "variant")
    assert not marker.exists(), "the pickle ran its code"
    assert_one_sentence(str(caught.value))
    assert name in str(caught.value) and "weights_only" in str(caught.value)
    out = out_folder(tmp_path, "out")
    before = snapshot(out)
    for role in ("base", "variant"):
        args = {"base": work.base, "variant": work.variant, role: path_copy}
        with pytest.raises(UserError):
            extract(ExtractOptions(**args, out=out / "x.safetensors"), log=quiet)
        assert not marker.exists(), "the pickle ran its code"
    assert snapshot(out) == before


# -- wrong pairs -----------------------------------------------------------------------------
def _variant_state(w: Work) -> dict[str, torch.Tensor]:
    return load_state(w.variant)


def lora_keys(path: Path) -> dict[str, torch.Tensor]:
    return load_state(path)


# -- the CLI cases, all run at once ------------------------------------------------------------
@dataclass
class CliCase:
    args: list
    out: Path
    code: int = 2
    mentions: tuple[str, ...] = ()
    check: Callable | None = None  # check(proc, case) for extra assertions


CLI_CASES: dict[str, Callable[[Work], CliCase]] = {}


def cli_case(name: str):
    def register(builder):
        CLI_CASES[name] = builder
        return builder

    return register


def _args(base, variant, out: Path, *extra) -> list:
    return ["--base", base, "--variant", variant, "--out", out / "lora.safetensors", *extra]


for _name in DAMAGED:

    def _variant_case(w, name=_name):
        bad = DAMAGED[name](w)
        out = out_folder(w.root, f"out_variant_{name}")
        return CliCase(_args(w.base, bad, out), out, 2, (bad.name, *DAMAGED_MENTIONS.get(name, ())))

    cli_case(f"damaged_variant_{_name}")(_variant_case)

for _name in DAMAGED_AS_BASE:

    def _base_case(w, name=_name):
        bad = DAMAGED[name](w)
        out = out_folder(w.root, f"out_base_{name}")
        return CliCase(_args(bad, w.variant, out), out, 2, (bad.name, *DAMAGED_MENTIONS.get(name, ())))

    cli_case(f"damaged_base_{_name}")(_base_case)

for _name in PAYLOADS:

    def _payload_case(w, name=_name):
        path, marker = build_payload(w, name)
        out = out_folder(w.root, f"out_payload_{name}")

        def check(proc, case):
            assert not marker.exists(), "the pickle ran its code"
            assert "refused" in proc.stderr

        return CliCase(_args(w.base, path, out), out, 2, (name, "weights_only"), check)

    cli_case(f"pickle_{_name}")(_payload_case)


@cli_case("valid_ckpt_base")
def _valid_ckpt(w):
    path = w.inputs / "base_state_dict.ckpt"
    torch.save({"state_dict": load_state(w.base), "global_step": 10}, str(path))
    out = out_folder(w.root, "out_valid_ckpt")

    def check(proc, case):
        assert (case.out / "lora.safetensors").exists()

    return CliCase(_args(path, w.variant, out), out, 0, check=check)


@cli_case("valid_legacy_pt_base")
def _valid_legacy_pt(w):
    path = w.inputs / "base_legacy.pt"
    torch.save(load_state(w.base), str(path), _use_new_zipfile_serialization=False)
    out = out_folder(w.root, "out_valid_legacy")

    def check(proc, case):
        assert (case.out / "lora.safetensors").exists()

    return CliCase(_args(path, w.variant, out), out, 0, check=check)


@cli_case("pair_sd15_base_zimage_variant")
def _sd15_vs_zimage(w):
    sd15 = sd15_like(w.inputs / "sd15_like.safetensors")
    out = out_folder(w.root, "out_sd15_vs_zimage")
    return CliCase(_args(sd15, w.variant, out), out, 2, (sd15.name, w.variant.name, "SD1.5", "Z-Image"))


@cli_case("pair_zimage_base_sd15_variant")
def _zimage_vs_sd15(w):
    sd15 = sd15_like(w.inputs / "sd15_like_v.safetensors", seed=1)
    out = out_folder(w.root, "out_zimage_vs_sd15")
    return CliCase(_args(w.base, sd15, out), out, 2, (sd15.name, w.base.name, "SD1.5", "Z-Image"))


def _report(case: CliCase) -> dict:
    return json.loads((case.out / "report.json").read_text())


@cli_case("pair_key_missing_in_variant")
def _key_missing(w):
    state = _variant_state(w)
    del state[KEY]
    state["only_in_variant.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)
    variant = save_state(state, w.inputs / "variant_missing_key.safetensors")
    out = out_folder(w.root, "out_key_missing")

    def check(proc, case):
        report = _report(case)
        skipped = [key for keys in report["skipped"].values() for key in keys]
        assert KEY in skipped, report["skipped"]
        assert "only_in_variant.weight" in skipped, report["skipped"]
        lora = lora_keys(case.out / "lora.safetensors")
        assert not any(k.startswith(LORA_MODULE + ".") for k in lora)
        assert any(k.startswith("diffusion_model.layers.0.feed_forward.w2.") for k in lora), "the rest was not extracted"

    return CliCase(_args(w.base, variant, out, "--report-json", out / "report.json"), out, 0, check=check)


@cli_case("pair_shape_mismatch")
def _shape_mismatch(w):
    state = _variant_state(w)
    state[KEY] = state[KEY][:-8].clone()
    variant = save_state(state, w.inputs / "variant_shape_mismatch.safetensors")
    out = out_folder(w.root, "out_shape_mismatch")

    def check(proc, case):
        warnings = [line for line in proc.stderr.splitlines() if KEY in line]
        assert warnings and "shape" in warnings[0], describe(proc)
        assert any(KEY in keys for keys in _report(case)["skipped"].values())
        lora = lora_keys(case.out / "lora.safetensors")
        assert not any(k.startswith(LORA_MODULE + ".") for k in lora)
        assert any(k.startswith("diffusion_model.layers.0.feed_forward.w2.") for k in lora), "the rest was not extracted"

    return CliCase(_args(w.base, variant, out, "--report-json", out / "report.json"), out, 0, check=check)


@cli_case("pair_identical")
def _identical(w):
    variant = copy(w.base, w.inputs / "identical_copy.safetensors")
    out = out_folder(w.root, "out_identical")
    return CliCase(_args(w.base, variant, out), out, 2, ("No difference", variant.name))


@cli_case("pair_not_derived")
def _not_derived(w):
    generator = torch.Generator().manual_seed(7)
    state = {k: (torch.randn(v.shape, generator=generator) * 0.05).to(v.dtype) for k, v in load_state(w.base).items()}
    variant = save_state(state, w.inputs / "unrelated.safetensors")
    out = out_folder(w.root, "out_not_derived")

    def check(proc, case):
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("Warning:") and "derived" in line]
        assert warnings, describe(proc)
        assert any(ch.isdigit() for ch in warnings[0]) and "%" in warnings[0], warnings[0]

    return CliCase(_args(w.base, variant, out), out, 0, check=check)


@cli_case("pair_nan_and_inf")
def _nan_and_inf(w):
    state = _variant_state(w)
    state[KEY] = state[KEY].clone()
    state[KEY][3, 5] = float("nan")
    state[OTHER_KEY] = state[OTHER_KEY].clone()
    state[OTHER_KEY][0, 0] = float("inf")
    variant = save_state(state, w.inputs / "variant_nan.safetensors")
    out = out_folder(w.root, "out_nan")

    def check(proc, case):
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("Warning:")]
        assert any(KEY in line and "NaN" in line for line in warnings), describe(proc)
        assert any("layers.0.attention." in line and "out" in line and "Inf" in line for line in warnings), describe(proc)
        lora = lora_keys(case.out / "lora.safetensors")
        assert all(bool(torch.isfinite(t.float()).all()) for t in lora.values())
        assert not any(k.startswith((LORA_MODULE + ".", "diffusion_model.layers.0.attention.to_out.0.")) for k in lora)
        assert any(k.startswith("diffusion_model.layers.0.feed_forward.w2.") for k in lora)

    return CliCase(_args(w.base, variant, out), out, 0, check=check)


# Run for real in a subprocess (all at once); the other cases call ``cli.main`` in this
# process, which is the same code without the torch import that costs ~1.5 s per run.
SUBPROCESS = {
    "damaged_variant_missing",
    "damaged_base_truncated_half",
    "damaged_variant_garbage_header",
    "damaged_variant_dtype_C64",
    "damaged_variant_header_deeply_nested",
    "pickle_raw_pickle_os_system.ckpt",
    "valid_ckpt_base",
    "pair_identical",
    "pair_nan_and_inf",
}


@pytest.fixture(scope="module")
def cli_runs(work):
    from concurrent.futures import ThreadPoolExecutor

    cases = {name: builder(work) for name, builder in CLI_CASES.items()}
    before = {name: snapshot(case.out) for name, case in cases.items()}
    with ThreadPoolExecutor(max_workers=1) as pool:
        real = pool.submit(run_cli_many, {name: cases[name].args for name in sorted(SUBPROCESS)})
        procs = {name: run_cli_inprocess(case.args) for name, case in cases.items() if name not in SUBPROCESS}
        procs.update(real.result())
    return {name: (case, before[name], procs[name]) for name, case in cases.items()}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli(cli_runs, name):
    case, before, proc = cli_runs[name]
    if case.code == 0:
        assert_success(proc)
    else:
        assert_clean_failure(proc, *case.mentions, code=case.code)
        assert snapshot(case.out) == before, "the output folder changed"
    assert not temp_leftovers(case.out)
    if case.check is not None:
        case.check(proc, case)


# -- the same damaged files through the library ------------------------------------------------
@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_library_damaged_file(work, name, tmp_path):
    bad = DAMAGED[name](work)
    with pytest.raises(UserError) as caught:
        with TensorFile(bad, "variant") as file:
            for key in file.keys():
                file.get(key)
    message = str(caught.value)
    assert_one_sentence(message)
    for mention in (bad.name, *DAMAGED_MENTIONS.get(name, ())):
        assert mention in message
    out = out_folder(tmp_path, "out")
    before = snapshot(out)
    with pytest.raises(UserError):
        extract(ExtractOptions(base=work.base, variant=bad, out=out / "x.safetensors"), log=quiet)
    assert snapshot(out) == before


def test_unreadable_file(work, tmp_path):
    """chmod 000: as root, checked through the CLI with the capabilities that let root
    read anything dropped (setpriv); as a normal user, also through the library."""
    prefix = permission_bits_prefix(tmp_path)
    if prefix is None:
        pytest.skip("running as root without setpriv: chmod 000 does not stop root from reading a file")
    bad = copy(work.variant, tmp_path / "unreadable.safetensors")
    out = out_folder(tmp_path, "out")
    before = snapshot(out)
    bad.chmod(0)
    try:
        proc = run_cli(_args(work.base, bad, out), prefix=prefix)
        if not IS_ROOT:
            with pytest.raises(UserError) as caught:
                TensorFile(bad, "variant")
            assert bad.name in str(caught.value)
            assert_one_sentence(str(caught.value))
    finally:
        bad.chmod(0o644)
    assert_clean_failure(proc, bad.name)
    assert snapshot(out) == before


def test_valid_checkpoint_base_through_library(work, tmp_path):
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": load_state(work.base)}, str(ckpt))
    result = extract(ExtractOptions(base=ckpt, variant=work.variant, out=tmp_path / "x.safetensors"), log=quiet)
    assert result.outputs == [tmp_path / "x.safetensors"] and result.architecture == "zimage"


# -- fuzzing the header reader -------------------------------------------------------------------
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def open_and_read(path: Path) -> None:
    """Only success or UserError are allowed, opening and reading every tensor."""
    try:
        with TensorFile(path, "model") as file:
            for key in file.keys():
                file.get(key)
    except UserError as error:
        assert_one_sentence(str(error))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(raw=st.binary(max_size=300))
def test_fuzz_random_bytes(fuzz_dir, raw):
    path = fuzz_dir / "random.safetensors"
    path.write_bytes(raw)
    open_and_read(path)


@FUZZ
@given(header=st.binary(max_size=300), data=st.binary(max_size=64), slack=st.integers(-4, 4))
def test_fuzz_random_header_with_plausible_length(fuzz_dir, header, data, slack):
    path = fuzz_dir / "plausible.safetensors"
    path.write_bytes(join_safetensors(header, data, header_len=max(0, len(header) + slack)))
    open_and_read(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
TINY = tiny_safetensors_bytes()
TINY_HEADER, TINY_DATA = split_safetensors(TINY)
TINY_KEYS = sorted(TINY_HEADER)
FIELDS = ["dtype", "shape", "data_offsets", "extra"]


@FUZZ
@given(
    key=st.sampled_from(TINY_KEYS),
    field_name=st.sampled_from(FIELDS),
    value=JSON_VALUES,
    drop=st.booleans(),
    cut=st.integers(0, len(TINY_DATA)),
)
def test_fuzz_mutated_valid_header(fuzz_dir, key, field_name, value, drop, cut):
    header = json.loads(json.dumps(TINY_HEADER))
    if key == "__metadata__" or drop and field_name == "extra":
        header[key] = value
    elif drop:
        header[key].pop(field_name, None)
    else:
        header[key][field_name] = value
    path = fuzz_dir / "mutated.safetensors"
    path.write_bytes(join_safetensors(header, TINY_DATA[: len(TINY_DATA) - cut]))
    open_and_read(path)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(TINY) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_byte_flips(fuzz_dir, flips):
    raw = bytearray(TINY)
    for position, value in flips:
        raw[position] = value
    path = fuzz_dir / "flipped.safetensors"
    path.write_bytes(bytes(raw))
    open_and_read(path)


# -- a battery of odd inputs (in-process CLI: exit code, stderr, folder) --------------------------
# name -> builder(work, out folder) -> (CLI args, expected exit code, what the message must name)
BATTERY: dict[str, Callable[[Work, Path], tuple]] = {}


def battery(name: str):
    def register(builder):
        BATTERY[name] = builder
        return builder

    return register


@battery("json_file_renamed")
def _json_renamed(w, out):
    path = w.inputs / "renamed_json.safetensors"
    path.write_text(json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}))
    return _args(w.base, path, out), 2


@battery("zip_renamed_safetensors")
def _zip_safetensors(w, out):
    path = w.inputs / "archive.safetensors"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model.txt", "hello")
    return _args(w.base, path, out), 2


@battery("zip_renamed_ckpt")
def _zip_ckpt(w, out):
    path = w.inputs / "archive.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model.txt", "hello")
    return _args(w.base, path, out), 2


@battery("text_file")
def _text_file(w, out):
    path = w.inputs / "notes.safetensors"
    path.write_text("hello world\nthis is not a model\n")
    return _args(path, w.variant, out), 2


@battery("dev_null")
def _dev_null(w, out):
    return _args("/dev/null", w.variant, out), 2


@battery("symlink_loop")
def _symlink_loop(w, out):
    a, b = w.inputs / "loop_a.safetensors", w.inputs / "loop_b.safetensors"
    for link, target in ((a, b), (b, a)):
        if not link.is_symlink():
            link.symlink_to(target)
    return _args(a, w.variant, out), 2


@battery("lora_as_base")
def _lora_as_base(w, out):
    lora = {
        LORA_MODULE + ".lora_A.weight": torch.randn(4, 64),
        LORA_MODULE + ".lora_B.weight": torch.randn(170, 4),
    }
    path = save_state(lora, w.inputs / "a_lora.safetensors")
    return _args(path, w.variant, out), 2, (path.name,)


@battery("lora_for_another_model_as_variant")
def _foreign_lora(w, out):
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    lora = {module + ".lora_down.weight": torch.randn(4, 64), module + ".lora_up.weight": torch.randn(64, 4)}
    path = save_state(lora, w.inputs / "sd_lora.safetensors")
    return _args(w.base, path, out), 2


@battery("safetensors_named_ckpt")
def _safetensors_named_ckpt(w, out):
    # recognised by its content and read as safetensors, never unpickled
    return _args(w.base, copy(w.variant, w.inputs / "really_safetensors.ckpt"), out), 0


@battery("checkpoint_holding_a_tensor")
def _ckpt_tensor(w, out):
    path = w.inputs / "one_tensor.pt"
    torch.save(torch.zeros(3), str(path))
    return _args(w.base, path, out), 2


@battery("all_nan_variant")
def _all_nan(w, out):
    state = {k: torch.full_like(v, float("nan")) for k, v in load_state(w.variant).items()}
    # Every layer is left out for NaN: the message must say so, not "matches the base".
    return _args(w.base, save_state(state, w.inputs / "all_nan.safetensors"), out), 2, ("NaN",)


@battery("duplicate_keys_in_header")
def _duplicate_keys(w, out):
    header, data = split_safetensors(w.variant.read_bytes())
    text = json.dumps(header)
    damaged = dict(header[KEY], dtype="C64")
    raw = (text[:-1] + f", {json.dumps(KEY)}: {json.dumps(damaged)}}}").encode()
    path = w.inputs / "duplicate_keys.safetensors"
    path.write_bytes(join_safetensors(raw, data))
    return _args(w.base, path, out), 2


@battery("metadata_not_a_dict")
def _metadata_list(w, out):
    path = edit_header(w.variant, w.inputs / "metadata_list.safetensors", lambda h: h.update(__metadata__=[1, 2]))
    return _args(w.base, path, out), 0


@battery("overlapping_offsets")
def _overlapping(w, out):
    # the NaN-free variant with one weight's bytes pointing at the start of another's
    header, _ = split_safetensors(w.variant.read_bytes())
    w2 = "layers.0.feed_forward.w3.weight"  # same shape and dtype as KEY
    path = edit_header(w.variant, w.inputs / "overlap.safetensors", _set(KEY, "data_offsets", header[w2]["data_offsets"]))
    return _args(w.base, path, out), 0


@battery("report_json_in_missing_folder")
def _report_missing_folder(w, out):
    # Checked before any work, like --out: a missing folder must not cost the whole run.
    return _args(w.base, w.variant, out, "--report-json", out / "no_such_folder" / "r.json"), 2, ("no_such_folder",)


@pytest.mark.parametrize("name", sorted(BATTERY))
def test_battery(work, name, tmp_path):
    out = out_folder(tmp_path, "out")
    args, expected, *rest = BATTERY[name](work, out)
    mentions = rest[0] if rest else ()
    before = snapshot(out)
    proc = run_cli_inprocess(args)
    code, stderr = proc.returncode, proc.stderr
    assert "Traceback" not in stderr, stderr
    assert code == expected, f"exit {code}: {stderr}"
    lines = [line for line in stderr.splitlines() if line.startswith("ckpt2lora: ")]
    if expected:
        assert len(lines) == 1, stderr
        assert_one_sentence(lines[0][len("ckpt2lora: ") :])
        for mention in mentions:
            assert mention in lines[0], lines[0]
        assert snapshot(out) == before, "the output folder changed"
    assert not temp_leftovers(out)
