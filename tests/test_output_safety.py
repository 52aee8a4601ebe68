"""Output safety (issue #6): a missing or read-only folder, an existing file, a disk that
fills while writing, too little free space for a checkpoint. Each ends in exit 2 with one
sentence and leaves the folder as it was; an existing file is untouched byte for byte
unless --overwrite is given, and then it is replaced whole.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import stat
from collections import namedtuple
from pathlib import Path

import pytest
from _bad_inputs import (
    assert_clean_failure,
    assert_success,
    load_state,
    one_torch_thread,
    out_folder,
    permission_bits_prefix,
    run_cli,
    run_cli_inprocess,
    run_cli_many,
    small_pair,
    snapshot,
    temp_leftovers,
)

from lib_ckpt2lora.errors import UserError
from lib_ckpt2lora.extract import extract
from lib_ckpt2lora.options import ExtractOptions

OLD_BYTES = b"an older file the user keeps\n" * 10


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return small_pair(tmp_path_factory.getbasetemp())



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield

def quiet(_message: str) -> None:
    pass


def args_for(pair, out: Path, *extra) -> list:
    return ["--base", pair[0], "--variant", pair[1], "--out", out, *extra]


# -- the output folder ------------------------------------------------------------------------
def test_missing_folder(pair, tmp_path):
    out = tmp_path / "no_such_folder" / "x.safetensors"
    assert_clean_failure(run_cli_inprocess(args_for(pair, out)), "no_such_folder")
    with pytest.raises(UserError):
        extract(ExtractOptions(base=pair[0], variant=pair[1], out=out), log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_output_is_a_folder(pair, tmp_path):
    out = out_folder(tmp_path, "out")
    (out / "x.safetensors").mkdir()
    before = snapshot(out)
    assert_clean_failure(run_cli_inprocess(args_for(pair, out / "x.safetensors", "--overwrite")), "x.safetensors")
    assert snapshot(out) == before


def test_output_name_without_safetensors_suffix(pair, tmp_path):
    out = out_folder(tmp_path, "out")
    before = snapshot(out)
    assert_clean_failure(run_cli_inprocess(args_for(pair, out / "x.ckpt")), "x.ckpt")
    assert snapshot(out) == before


def test_folder_not_writable(pair, tmp_path):
    prefix = permission_bits_prefix(tmp_path)
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits do not stop root from writing")
    out = out_folder(tmp_path, "read_only")
    before = snapshot(out)
    out.chmod(0o555)
    try:
        proc = run_cli(args_for(pair, out / "x.safetensors"), prefix=prefix)
    finally:
        out.chmod(0o755)
    assert_clean_failure(proc, str(out))
    assert snapshot(out) == before


# -- an existing output file -------------------------------------------------------------------
def test_existing_file_kept_then_replaced(pair, tmp_path):
    """Without --overwrite: exit 2, untouched byte for byte (also the detail file); with it:
    replaced by a complete LoRA. The CLI runs of both go at once."""
    kept = out_folder(tmp_path, "kept")
    (kept / "x.safetensors").write_bytes(OLD_BYTES)
    detail = out_folder(tmp_path, "detail")
    (detail / "x_detail.safetensors").write_bytes(OLD_BYTES)
    replaced = out_folder(tmp_path, "replaced")
    (replaced / "x.safetensors").write_bytes(OLD_BYTES)
    before = {folder: snapshot(folder) for folder in (kept, detail)}
    runs = run_cli_many(
        {
            "kept": args_for(pair, kept / "x.safetensors"),
            "detail": args_for(pair, detail / "x.safetensors", "--detail"),
            "replaced": args_for(pair, replaced / "x.safetensors", "--overwrite"),
        }
    )
    assert_clean_failure(runs["kept"], "x.safetensors", "--overwrite")
    assert (kept / "x.safetensors").read_bytes() == OLD_BYTES
    assert_clean_failure(runs["detail"], "x_detail.safetensors", "--overwrite")
    for folder, snap in before.items():
        assert snapshot(folder) == snap
    assert_success(runs["replaced"])
    assert (replaced / "x.safetensors").read_bytes() != OLD_BYTES
    assert load_state(replaced / "x.safetensors"), "the replacement is not a readable LoRA"
    assert not temp_leftovers(replaced)


def test_existing_file_library(pair, tmp_path):
    out = out_folder(tmp_path, "out")
    (out / "x.safetensors").write_bytes(OLD_BYTES)
    before = snapshot(out)
    for checkpoint in (False, True):
        with pytest.raises(UserError) as caught:
            extract(ExtractOptions(base=pair[0], variant=pair[1], out=out / "x.safetensors", checkpoint=checkpoint), log=quiet)
        assert "x.safetensors" in str(caught.value)
        assert snapshot(out) == before
    extract(ExtractOptions(base=pair[0], variant=pair[1], out=out / "x.safetensors", overwrite=True), log=quiet)
    assert (out / "x.safetensors").read_bytes() != OLD_BYTES
    assert not temp_leftovers(out)


def test_output_gets_the_usual_permissions(pair, tmp_path):
    """The temporary file comes from mkstemp (mode 0600); once renamed into place the
    output must have the mode any new file gets (0666 minus the umask), or a WebUI
    running as another user cannot read the LoRA."""
    out = out_folder(tmp_path, "out")
    old_umask = os.umask(0o022)
    try:
        extract(ExtractOptions(base=pair[0], variant=pair[1], out=out / "x.safetensors"), log=quiet)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((out / "x.safetensors").stat().st_mode) == 0o644


def test_file_appearing_while_writing_is_left_alone(pair, tmp_path):
    """Another program creates the output while a checkpoint is being written: it is kept,
    the run fails with one sentence, and the temporary file is removed."""
    out = out_folder(tmp_path, "out")
    target = out / "x.safetensors"

    def progress(done, total, key):
        if done == 2:
            assert temp_leftovers(out), "the checkpoint is not written through a temporary file"
            target.write_bytes(OLD_BYTES)

    with pytest.raises(UserError) as caught:
        extract(ExtractOptions(base=pair[0], variant=pair[1], out=target, checkpoint_full=True), progress=progress, log=quiet)
    assert "x.safetensors" in str(caught.value)
    assert target.read_bytes() == OLD_BYTES
    assert not temp_leftovers(out)


# -- the disk fills up -------------------------------------------------------------------------
def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG

    return apply


def test_disk_fills_while_writing(pair, tmp_path):
    """RLIMIT_FSIZE makes every write past the limit fail with EFBIG, as a full disk does
    (ENOSPC); the LoRA (~100 KiB) and the checkpoint (~1.3 MiB) both pass the limit."""
    lora_out, ckpt_out = out_folder(tmp_path, "lora"), out_folder(tmp_path, "ckpt")
    before = {folder: snapshot(folder) for folder in (lora_out, ckpt_out)}
    runs = run_cli_many(
        {
            "lora": args_for(pair, lora_out / "x.safetensors"),
            "ckpt": args_for(pair, ckpt_out / "x.safetensors", "--checkpoint-full"),
        },
        preexec_fn=_file_size_limit(48 * 1024),
    )
    for name, folder in (("lora", lora_out), ("ckpt", ckpt_out)):
        message = assert_clean_failure(runs[name], "x.safetensors")
        assert "space" in message or "write" in message, message
        assert snapshot(folder) == before[folder], f"{name}: a partial file was left behind"


FakeUsage = namedtuple("FakeUsage", "total used free")


@pytest.mark.parametrize("flag", ["checkpoint", "checkpoint_full"])
def test_free_space_checked_before_writing_a_checkpoint(pair, tmp_path, monkeypatch, flag):
    out = out_folder(tmp_path, "out")
    before = snapshot(out)
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return FakeUsage(10 * 2**30, 10 * 2**30 - 2**20, 2**20)  # 1 MiB free

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    layers = []
    opts = ExtractOptions(base=pair[0], variant=pair[1], out=out / "x.safetensors", **{flag: True})
    with pytest.raises(UserError) as caught:
        extract(opts, progress=lambda done, total, key: layers.append(key), log=quiet)
    assert asked, "the free space was not checked"
    message = str(caught.value)
    assert "free" in message and str(out) in message, message
    assert layers == [], "work was done before the free-space check"
    assert snapshot(out) == before
