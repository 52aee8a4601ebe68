"""--list-layers: a dry run listing each layer, its shape and the run's decision.

The listing must be the run's own plan (the layers it lists as extracted are exactly the
layers a real run with the same options extracts), give a reason for every other layer,
need no --out and write nothing. --include/--exclude keep matching substrings (the
original's examples rely on that), which the listing makes visible.
"""

from __future__ import annotations

import re
import signal

import pytest
import tiny_models as tm
from _feature_models import silent_log, torch_threads

from lib_ckpt2lora.cli import main
from lib_ckpt2lora.extract import extract
from lib_ckpt2lora.options import ExtractOptions

COUNT = re.compile(r"^(\d+) of (\d+) layers would be extracted\.$", re.M)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def cli(capsys):
    """``main(argv)`` in this process: (exit code, stdout, stderr); signal handlers restored."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def run(*argv):
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("listing")
    model = tm.sdxl_model(0)
    states = model.states()
    base = tm.save(tm.checkpoint_for(model, states), folder / "base.safetensors")
    variant_state = tm.checkpoint_for(model, tm.variant_states(states))
    variant = tm.save(variant_state, folder / "variant.safetensors")
    base_state = tm.checkpoint_for(model, states)
    return dict(folder=folder, base=base, variant=variant, variant_state=variant_state, base_state=base_state)


def parse(stdout: str) -> dict[str, tuple[str, str]]:
    """key -> (shape, status) from the listing's table lines."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and not COUNT.match(line) and not line.startswith("Warning"):
            rows[parts[0]] = (parts[1], parts[2])
    return rows


@pytest.mark.parametrize("options", [["--include", "attn"], ["--exclude", "embedders.1,proj_in"], ["--min-dim", "40"]])
def test_listing_is_the_runs_plan_and_writes_nothing(cli, sdxl, tmp_path, options):
    before = sorted(p.name for p in sdxl["folder"].iterdir())
    code, stdout, stderr = cli("--base", sdxl["base"], "--variant", sdxl["variant"], "--list-layers", *options)
    assert code == 0, stderr
    assert sorted(p.name for p in sdxl["folder"].iterdir()) == before
    rows = parse(stdout)
    listed = {key for key, (_, status) in rows.items() if status.startswith("extract")}
    extracted_count, total = map(int, COUNT.search(stdout).groups())
    assert extracted_count == len(listed) and total == len(rows)
    assert all(status for _, status in rows.values())

    flags = dict(zip(options[::2], options[1::2]))
    settings = {name.lstrip("-").replace("-", "_"): value for name, value in flags.items()}
    if "min_dim" in settings:
        settings["min_dim"] = int(settings["min_dim"])
    out = tmp_path / "run.safetensors"
    result = extract(ExtractOptions(base=sdxl["base"], variant=sdxl["variant"], out=out, **settings), log=silent_log)
    assert {record.key for record in result.report.layers} == listed
    for reason, keys in result.report.skipped.items():  # every reason a run gives, the listing gives
        for key in keys:
            assert rows[key][1].startswith(reason), (key, rows[key], reason)


def test_listing_shows_shapes_and_every_kind_of_reason(cli, sdxl, tmp_path):
    state = dict(sdxl["variant_state"])
    proj = next(k for k in state if k.endswith("proj_in.weight"))
    state[proj] = state[proj][:, :-1].contiguous()  # a shape the base does not have
    dropped = next(k for k in state if k.endswith("ff.net.2.weight"))
    del state[dropped]
    variant = tm.save(state, tmp_path / "odd.safetensors")
    code, stdout, _ = cli("--base", sdxl["base"], "--variant", variant, "--list-layers", "--exclude", "ff.net.0")
    assert code == 0
    rows = parse(stdout)
    canonical = {key: key for key in rows}  # SDXL UNet keys are canonical as written
    assert rows[canonical[proj]][1] == "shape differs from the base"
    assert rows[dropped][1] == "not in odd.safetensors"
    assert any(status == "in --exclude" for _, status in rows.values())
    assert any(status == "1-D (use --full-layer)" for _, status in rows.values())
    assert any(status == "below --min-dim" for _, status in rows.values())
    some_key = next(k for k, (_, status) in rows.items() if status.startswith("extract as lora_unet_"))
    assert rows[some_key][0] == "x".join(str(d) for d in sdxl["base_state"][some_key].shape)
    assert "has shape" in stdout and "odd.safetensors" in stdout  # the run's warnings too


def test_include_matches_substrings_as_the_original_does(cli, tmp_path):
    """--include te keeps every key holding "te": Z-Image's attention layers too. The
    listing shows it before a run."""
    state = {k: v.detach().clone() for k, v in tm.zimage_transformer(0).state_dict().items()}
    variant = tm.make_variant(state, rank=2, scale=0.02, seed=5)
    base_path = tm.save(tm.zimage_checkpoint(state), tmp_path / "base.safetensors")
    variant_path = tm.save(tm.zimage_checkpoint(variant), tmp_path / "variant.safetensors")
    code, stdout, _ = cli("--base", base_path, "--variant", variant_path, "--list-layers", "--include", "te", "--min-dim", "1")
    assert code == 0
    rows = parse(stdout)
    assert any(".attention." in key and status.startswith("extract") for key, (_, status) in rows.items())
    assert any(status == "not in --include" for _, status in rows.values())


def test_out_is_needed_only_without_list_layers(cli, sdxl):
    code, _, stderr = cli("--base", sdxl["base"], "--variant", sdxl["variant"])
    assert code == 2 and "--out" in stderr and "Traceback" not in stderr


def test_listing_refuses_bad_options_in_one_sentence(cli, sdxl):
    code, stdout, stderr = cli("--base", sdxl["base"], "--variant", sdxl["variant"], "--list-layers", "--rank", "-1")
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "--rank" in stderr
