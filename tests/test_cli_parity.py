"""The command line keeps the original script's flags, defaults and behaviour.

Every original flag is listed by ``-h`` with the original defaults; invalid combinations
end with exit code 2 and one sentence on stderr, no traceback; ``--summary`` prints the
original table; ``--include`` / ``--exclude`` select layers by key segment; ``--full-layer``
writes 1-D tensors as ``.diff`` / ``.diff_b`` and disables the min-dim filter.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from _feature_models import torch_threads
from safetensors.torch import load_file

from lib_ckpt2lora.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_FLAGS = (
    "--base", "--variant", "--variant2", "--out", "--rank", "--rank-thresh", "--rank-max", "--min-dim",
    "--exclude", "--include", "--full-layer", "--union", "--alpha", "--checkpoint", "--checkpoint-full",
    "--verbose", "--summary", "--detail", "--detail-scale",
)  # fmt: skip
ORIGINAL_DEFAULTS = {"rank": 0, "rank_thresh": 0.95, "rank_max": 64, "min_dim": 32, "alpha": 0.5, "detail_scale": 1.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def cli(capsys):
    """Run ``main(argv)`` in this process; returns (exit code, stdout, stderr).

    main() installs its own SIGINT/SIGTERM handlers; the test's are put back after."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def run(*argv):
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Tiny Z-Image, original layout; the variant changes every float tensor, 1-D included."""
    folder = tmp_path_factory.mktemp("cli")
    state = {k: v.detach().clone() for k, v in tm.zimage_transformer(0).state_dict().items()}
    variant = tm.make_variant(state, rank=3, scale=0.02, seed=61, include_1d=True)
    base = tm.save(tm.zimage_checkpoint(state), folder / "base.safetensors")
    changed = tm.save(tm.zimage_checkpoint(variant), folder / "variant.safetensors")
    return dict(folder=folder, state=state, variant=variant, base=base, changed=changed)


def one_sentence(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    line = lines[0]
    assert line.startswith("ckpt2lora: ") and line.endswith("."), line
    return line


# -- flags and defaults ---------------------------------------------------------------------------


def test_help_lists_every_original_flag_with_original_defaults():
    done = subprocess.run([sys.executable, "-m", "lib_ckpt2lora", "-h"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    listed = set(re.findall(r"(--[a-z0-9-]+)", done.stdout))
    missing = [flag for flag in ORIGINAL_FLAGS if flag not in listed]
    assert not missing, missing
    text = " ".join(done.stdout.split())
    for phrase in ("(default: 0.95)", "(default: 64)", "(default: 32)", "(default: 1.0)", "Default 0.5", "0 = auto-select"):
        assert phrase in text, phrase
    args = build_parser().parse_args(["--base", "b", "--variant", "v", "--out", "o.safetensors"])
    for name, value in ORIGINAL_DEFAULTS.items():
        assert getattr(args, name) == value, name
    for name in ("full_layer", "union", "checkpoint", "checkpoint_full", "verbose", "summary", "detail"):
        assert getattr(args, name) is False, name
    assert args.variant2 is None and args.include == "" and args.exclude == ""


INVALID = {
    "--union without --variant2": (["--union"], "--variant2"),
    "--alpha above 1": (["--variant2", "v2.safetensors", "--union", "--alpha", "1.5"], "--alpha"),
    "--alpha below 0": (["--variant2", "v2.safetensors", "--alpha", "-0.1"], "--alpha"),
    "--checkpoint with --checkpoint-full": (["--checkpoint", "--checkpoint-full"], "--checkpoint"),
    "--rank-thresh 0": (["--rank-thresh", "0"], "--rank-thresh"),
    "--rank-thresh above 1": (["--rank-thresh", "1.5"], "--rank-thresh"),
    "negative --rank": (["--rank", "-3"], "--rank"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_combinations_exit_2_with_one_sentence(cli, pair, case):
    extra, mentioned = INVALID[case]
    out = pair["folder"] / "never.safetensors"
    code, stdout, stderr = cli("--base", pair["base"], "--variant", pair["changed"], "--out", out, *extra)
    assert code == 2
    assert mentioned in one_sentence(stderr)
    assert not out.exists()


def test_non_numeric_rank_thresh_exits_2_without_traceback(cli, pair):
    code, _, stderr = cli("--base", pair["base"], "--variant", pair["changed"], "--out", "x.safetensors", "--rank-thresh", "high")
    assert code == 2
    assert "--rank-thresh" in stderr and "Traceback" not in stderr


def test_real_entry_point_exits_2_with_one_sentence(pair):
    done = subprocess.run(
        [sys.executable, "-m", "lib_ckpt2lora", "--base", str(pair["base"]), "--variant", str(pair["changed"]),
         "--out", str(pair["folder"] / "never.safetensors"), "--checkpoint", "--checkpoint-full"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    one_sentence(done.stderr)


# -- the summary table ----------------------------------------------------------------------------


def test_summary_prints_the_original_table(cli, pair):
    out = pair["folder"] / "summary.safetensors"
    code, stdout, stderr = cli("--base", pair["base"], "--variant", pair["changed"], "--out", out, "--summary", "--overwrite")
    assert code == 0, stderr
    lines = stdout.splitlines()
    headers = [line for line in lines if line.split()[:8] == ["Level", "Type", "n", "rank", "S_max", "S_min", "ratio", "energy"]]
    assert len(headers) == 1, stdout
    total = [line for line in lines if line.split()[:2] == ["Total", "ALL"]]
    assert len(total) == 1, stdout
    n = int(total[0].split()[2])
    assert n == len([k for k in load_file(str(out)) if k.endswith(".lora_A.weight")])
    assert re.search(r"^\S.*\s(Attn|FF|Mod|Proj|Other)\s+\d+\s+[\d.]+\s+\S+\s+\S+\s+[\d.]+x\s+[\d.]+%$", stdout, re.M)
    assert "[ Auxiliary ]" in stdout


def test_verbose_adds_a_line_per_layer(cli, pair):
    out = pair["folder"] / "verbose.safetensors"
    code, stdout, _ = cli("--base", pair["base"], "--variant", pair["changed"], "--out", out, "--verbose", "--overwrite")
    assert code == 0
    modules = [k[: -len(".lora_A.weight")] for k in load_file(str(out)) if k.endswith(".lora_A.weight")]
    for module in modules:
        assert module[:64] in stdout, module
    assert "Total" in stdout


# -- layer selection --------------------------------------------------------------------------------


def modules_written(path: Path) -> set[str]:
    return {k.rsplit(".lora_", 1)[0] for k in load_file(str(path)) if ".lora_" in k}


def test_include_and_exclude_select_by_key_segment(cli, pair):
    folder = pair["folder"]
    every = folder / "every.safetensors"
    assert cli("--base", pair["base"], "--variant", pair["changed"], "--out", every, "--overwrite")[0] == 0
    all_modules = modules_written(every)
    assert any(".feed_forward." in m for m in all_modules) and any("refiner" in m for m in all_modules)

    only = folder / "only_attention.safetensors"
    assert (
        cli("--base", pair["base"], "--variant", pair["changed"], "--out", only, "--include", "attention", "--overwrite")[0] == 0
    )
    assert modules_written(only) == {m for m in all_modules if ".attention." in m}

    several = folder / "without.safetensors"
    code, _, _ = cli(
        "--base", pair["base"], "--variant", pair["changed"], "--out", several, "--exclude", "feed_forward,refiner", "--overwrite"
    )
    assert code == 0
    assert modules_written(several) == {m for m in all_modules if ".feed_forward." not in m and "refiner" not in m}

    # a segment of the file's own (original-layout) key also selects: qkv -> to_q, to_k, to_v
    fused = folder / "only_qkv.safetensors"
    assert cli("--base", pair["base"], "--variant", pair["changed"], "--out", fused, "--include", "qkv", "--overwrite")[0] == 0
    assert modules_written(fused) == {m for m in all_modules if m.endswith((".to_q", ".to_k", ".to_v"))}


def test_full_layer_writes_diff_and_diff_b_and_disables_min_dim(cli, pair):
    folder, state, variant = pair["folder"], pair["state"], pair["variant"]
    plain = folder / "min_dim.safetensors"
    assert cli("--base", pair["base"], "--variant", pair["changed"], "--out", plain, "--min-dim", "100", "--overwrite")[0] == 0
    plain_modules = modules_written(plain)
    assert not any(m.endswith(".attention.to_out.0") for m in plain_modules)  # 96 x 96 < 100

    full = folder / "full_layer.safetensors"
    code, _, stderr = cli(
        "--base", pair["base"], "--variant", pair["changed"], "--out", full, "--min-dim", "100", "--full-layer",
        "--save-dtype", "fp32", "--overwrite",
    )  # fmt: skip
    assert code == 0, stderr
    written = load_file(str(full))
    assert any(m.endswith(".attention.to_out.0") for m in modules_written(full))  # min-dim disabled
    one_d = [k for k, v in state.items() if v.dim() == 1 and not torch.equal(v, variant[k])]
    assert any(k.endswith(".bias") for k in one_d) and any(k.endswith(".weight") for k in one_d)
    for key in one_d:
        module, _, param = key.rpartition(".")
        name = "diffusion_model." + module + (".diff_b" if param == "bias" else ".diff")
        assert name in written, name
        assert torch.allclose(written[name], variant[key] - state[key], rtol=1e-5, atol=1e-7), name
    assert not any(k.endswith((".diff", ".diff_b")) for k in load_file(str(plain)))
