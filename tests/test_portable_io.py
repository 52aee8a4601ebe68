"""Portable reading and writing (issue 9): what Windows and network drives do differently.

* paths with spaces, Japanese/Chinese names and long paths, end to end through the CLI
  (inputs, outputs, the detail LoRA, --report-json);
* reads that return short (Linux caps one read at 0x7ffff000 bytes, network drives return
  less): the tensor must still read exactly, and only a real early end says "truncated";
* Windows refusing to replace a file another program holds open: retried for a moment
  (a scan that lets go is waited out), then one sentence, the old file byte-identical,
  nothing left behind; the same for a folder that refuses the rename (read-only);
* --overwrite with --detail is all or nothing (issue 10 section 4): a failure while writing
  or renaming the second file leaves both old files as they were.

These also run in the Windows-surface lane (tests/windows_surface/run.sh), where every
function Windows' ``os`` lacks is removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from _bad_inputs import (
    assert_clean_failure,
    assert_one_sentence,
    assert_success,
    load_state,
    one_torch_thread,
    out_folder,
    run_cli,
    run_cli_inprocess,
    small_pair,
    snapshot,
)
from safetensors import safe_open

from lib_ckpt2lora.errors import UserError
from lib_ckpt2lora.extract import extract
from lib_ckpt2lora.options import ExtractOptions
from lib_ckpt2lora.reading import TensorFile
from lib_ckpt2lora.writing import write_tensors

OLD_MAIN = b"the user's old LoRA\n" * 16
OLD_DETAIL = b"the user's old detail LoRA\n" * 16


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return small_pair(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def quiet(_message: str) -> None:
    pass


def hidden_files(folder: Path) -> list[str]:
    """Temporary (.part) files and backups (.previous) the writer might leave."""
    return sorted(p.name for p in folder.rglob(".*"))


# -- names --------------------------------------------------------------------------------------
def test_spaces_non_ascii_and_long_paths_end_to_end(pair, tmp_path):
    """A real CLI process: inputs, output, detail LoRA and report under names with spaces,
    Japanese and Chinese characters, in a folder whose path is over 260 characters."""
    models = tmp_path / "モデル 模型 folder"
    models.mkdir()
    base = Path(shutil.copy(pair[0], models / "ベース model 基础.safetensors"))
    variant = Path(shutil.copy(pair[1], models / "微调 バリアント v2.safetensors"))
    deep = tmp_path / "出力 output"
    while len(str(deep)) < 300:
        deep = deep / "長い フォルダ 很长的文件夹"
    deep.mkdir(parents=True)
    out = deep / "ロラ 测试 LoRA.safetensors"
    report = deep / "レポート 报告.json"
    proc = run_cli(["--base", base, "--variant", variant, "--out", out, "--detail", "--report-json", report])
    assert_success(proc)
    lora = load_state(out)
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
    detail = deep / "ロラ 测试 LoRA_detail.safetensors"
    assert detail.exists() and load_state(detail)
    assert json.loads(report.read_text(encoding="utf-8")), "the report is empty"
    assert out.name in proc.stdout + proc.stderr, "the output's name is not shown as written"
    assert not hidden_files(deep)


def test_error_names_a_non_ascii_file(pair, tmp_path):
    out = out_folder(tmp_path, "出力 フォルダ")
    (out / "既存 LoRA.safetensors").write_bytes(OLD_MAIN)
    proc = run_cli_inprocess(["--base", pair[0], "--variant", pair[1], "--out", out / "既存 LoRA.safetensors"])
    assert_clean_failure(proc, "既存 LoRA.safetensors", "--overwrite")


# -- short reads ----------------------------------------------------------------------------------
class ShortReads:
    """A file handle whose reads return at most ``limit`` bytes, as a network drive does."""

    def __init__(self, handle, limit: int):
        self.handle, self.limit, self.reads = handle, limit, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def readinto(self, buffer) -> int:
        self.reads += 1
        return self.handle.readinto(memoryview(buffer)[: self.limit])

    def fileno(self) -> int:
        return self.handle.fileno()

    def close(self) -> None:
        self.handle.close()


@pytest.fixture(scope="module")
def big_tensor_file(tmp_path_factory) -> Path:
    """One 4.6 MiB bf16 tensor (more than four 1 MiB reads) and a small one."""
    path = tmp_path_factory.mktemp("short") / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(1200, 2000, generator=generator).to(torch.bfloat16),
        "small": torch.randn(3, 5, generator=generator),
    }
    write_tensors(path, tensors, {}, overwrite=False, with_hash=False)
    return path


@pytest.mark.parametrize("limit", [1 << 20, 999_983])
def test_short_reads_still_read_the_whole_tensor(big_tensor_file, limit):
    with safe_open(str(big_tensor_file), framework="pt") as reference:
        expected = {key: reference.get_tensor(key) for key in reference.keys()}
    with TensorFile(big_tensor_file) as file:
        file._handle = ShortReads(file._handle, limit)
        for key, tensor in expected.items():
            assert torch.equal(file.get(key), tensor), key
        assert torch.equal(file.get("big", rows=(7, 1111)), expected["big"][7:1111])
        assert file._handle.reads > 2 * (expected["big"].numel() * 2 // limit), "the reads were not short"


def test_file_truncated_after_opening_says_truncated(big_tensor_file, tmp_path):
    """A file that ends early (here: cut after its header was read) is the real
    'truncated' case: one sentence naming the file and the tensor."""
    path = Path(shutil.copy(big_tensor_file, tmp_path / "cut model.safetensors"))
    with TensorFile(path, "variant") as file:
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
        with pytest.raises(UserError) as caught:
            for key in file.keys():
                file.get(key)
    message = str(caught.value)
    assert_one_sentence(message)
    assert "truncated" in message and "cut model.safetensors" in message


# -- Windows: a file in use cannot be replaced ------------------------------------------------------
def windows_in_use(target_name: str):
    """os.replace as Windows answers when ``target_name`` is open in another program: it
    can be neither replaced nor renamed away."""
    real_replace = os.replace

    def replace(source, destination):
        if target_name in (Path(source).name, Path(destination).name):
            error = PermissionError(errno.EACCES, "The process cannot access the file: it is being used by another process")
            error.winerror = 32
            raise error
        return real_replace(source, destination)

    return replace


def test_replacing_a_file_in_use_says_so_and_keeps_it(pair, tmp_path, monkeypatch):
    out = out_folder(tmp_path, "out")
    target = out / "in use.safetensors"
    target.write_bytes(OLD_MAIN)
    before = snapshot(out)
    monkeypatch.setattr(os, "replace", windows_in_use(target.name))
    with pytest.raises(UserError) as caught:
        extract(ExtractOptions(base=pair[0], variant=pair[1], out=target, overwrite=True), log=quiet)
    message = str(caught.value)
    assert_one_sentence(message)
    assert "in use.safetensors" in message and "close" in message and "another name" in message
    assert target.read_bytes() == OLD_MAIN
    assert snapshot(out) == before and not hidden_files(out)
    proc = run_cli_inprocess(["--base", pair[0], "--variant", pair[1], "--out", target, "--overwrite"])
    assert_clean_failure(proc, "in use.safetensors")
    assert snapshot(out) == before


def test_a_file_held_for_a_moment_is_replaced_after_a_retry(pair, tmp_path, monkeypatch):
    """An antivirus scan or the search indexer holds the old file for a moment: the rename
    is retried and succeeds, no error, the new LoRA in place, nothing left beside it."""
    out = out_folder(tmp_path, "out")
    target = out / "scanned.safetensors"
    target.write_bytes(OLD_MAIN)
    names = sorted(snapshot(out))
    held = windows_in_use(target.name)
    refusals = []

    def replace(source, destination):
        if len(refusals) < 3:
            try:
                return held(source, destination)
            except PermissionError:
                refusals.append(destination)
                raise
        return os.replace.__wrapped__(source, destination)

    replace.__wrapped__ = os.replace
    monkeypatch.setattr(os, "replace", replace)
    extract(ExtractOptions(base=pair[0], variant=pair[1], out=target, overwrite=True), log=quiet)
    assert len(refusals) == 3
    assert target.read_bytes() != OLD_MAIN and load_state(target)
    assert sorted(snapshot(out)) == names and not hidden_files(out)


def test_a_file_held_for_good_is_retried_for_a_moment_then_refused(pair, tmp_path, monkeypatch):
    """A program that keeps the file open (the WebUI with the LoRA loaded): the rename is
    tried again for about REPLACE_RETRY_SECONDS, then one sentence, the old file kept."""
    from lib_ckpt2lora import writing

    out = out_folder(tmp_path, "out")
    target = out / "loaded.safetensors"
    target.write_bytes(OLD_MAIN)
    before = snapshot(out)
    held = windows_in_use(target.name)
    attempts = []

    def replace(source, destination):
        attempts.append(time.monotonic())
        return held(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError) as caught:
        extract(ExtractOptions(base=pair[0], variant=pair[1], out=target, overwrite=True), log=quiet)
    assert_one_sentence(str(caught.value))
    assert "in use by another program" in str(caught.value)
    assert len(attempts) >= 4, "refused without retrying"
    assert writing.REPLACE_RETRY_SECONDS * 0.5 <= attempts[-1] - attempts[0] <= writing.REPLACE_RETRY_SECONDS + 1
    assert target.read_bytes() == OLD_MAIN and snapshot(out) == before and not hidden_files(out)


@pytest.mark.parametrize("windows", [True, False], ids=["WinError-5", "EACCES"])
def test_output_folder_turned_read_only_during_the_run(pair, tmp_path, monkeypatch, windows):
    """The folder was writable when the run started (checked first) but refuses the final
    rename (made read-only meanwhile; or, on Windows, an ACL that lets us create but not
    rename): one sentence naming the folder, nothing left in it."""
    out = out_folder(tmp_path, "out")
    target = out / "new.safetensors"
    before = snapshot(out)

    def replace(source, destination):
        error = PermissionError(errno.EACCES, "Access is denied" if windows else "Permission denied")
        if windows:
            error.winerror = 5
        raise error

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr("lib_ckpt2lora.writing.REPLACE_RETRY_SECONDS", 0.2)
    with pytest.raises(UserError) as caught:
        extract(ExtractOptions(base=pair[0], variant=pair[1], out=target), log=quiet)
    message = str(caught.value)
    assert_one_sentence(message)
    assert "read-only" in message and str(out) in message and "another folder" in message
    assert snapshot(out) == before and not hidden_files(out)
    proc = run_cli_inprocess(["--base", pair[0], "--variant", pair[1], "--out", target])
    assert_clean_failure(proc, "read-only")
    assert snapshot(out) == before and not hidden_files(out)


# -- --overwrite --detail: all or nothing ----------------------------------------------------------
def _old_pair(tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    out = out_folder(tmp_path, "out")
    main, detail = out / "x.safetensors", out / "x_detail.safetensors"
    main.write_bytes(OLD_MAIN)
    detail.write_bytes(OLD_DETAIL)
    return out, main, detail, snapshot(out)


def _extract_pair(pair, main: Path):
    return extract(ExtractOptions(base=pair[0], variant=pair[1], out=main, detail=True, overwrite=True), log=quiet)


@pytest.mark.parametrize("failing", ["x.safetensors", "x_detail.safetensors"])
def test_overwrite_detail_rename_fails_keeps_both_old_files(pair, tmp_path, monkeypatch, failing):
    out, main, detail, before = _old_pair(tmp_path)
    monkeypatch.setattr(os, "replace", windows_in_use(failing))
    with pytest.raises(UserError) as caught:
        _extract_pair(pair, main)
    assert failing in str(caught.value)
    assert main.read_bytes() == OLD_MAIN and detail.read_bytes() == OLD_DETAIL
    assert snapshot(out) == before and not hidden_files(out)


def test_overwrite_detail_write_fails_keeps_both_old_files(pair, tmp_path, monkeypatch):
    """The disk fills while the detail file is written (the second fsync)."""
    out, main, detail, before = _old_pair(tmp_path)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(UserError) as caught:
        _extract_pair(pair, main)
    assert "x_detail.safetensors" in str(caught.value) and "disk space" in str(caught.value)
    assert main.read_bytes() == OLD_MAIN and detail.read_bytes() == OLD_DETAIL
    assert snapshot(out) == before and not hidden_files(out)


def test_overwrite_detail_replaces_both(pair, tmp_path):
    out, main, detail, _ = _old_pair(tmp_path)
    result = _extract_pair(pair, main)
    assert result.outputs == [main, detail]
    assert load_state(main) and load_state(detail)
    assert main.read_bytes() != OLD_MAIN and detail.read_bytes() != OLD_DETAIL
    assert not hidden_files(out)


@pytest.mark.parametrize("failing", ["x.safetensors", "x_detail.safetensors"])
def test_overwrite_checkpoint_detail_rename_fails_keeps_both_old_files(pair, tmp_path, monkeypatch, failing):
    """--checkpoint --detail --overwrite: the checkpoint and its detail LoRA land together or
    not at all (the detail file is renamed first, so failing the checkpoint's rename, the
    second, must put the old detail file back)."""
    out, main, detail, before = _old_pair(tmp_path)
    monkeypatch.setattr(os, "replace", windows_in_use(failing))
    with pytest.raises(UserError) as caught:
        _extract_checkpoint_pair(pair, main)
    assert failing in str(caught.value)
    assert main.read_bytes() == OLD_MAIN and detail.read_bytes() == OLD_DETAIL
    assert snapshot(out) == before and not hidden_files(out)


def test_overwrite_checkpoint_detail_replaces_both(pair, tmp_path):
    out, main, detail, _ = _old_pair(tmp_path)
    result = _extract_checkpoint_pair(pair, main)
    assert result.outputs == [main, detail]
    assert load_state(main) and load_state(detail)
    assert not hidden_files(out)


def _extract_checkpoint_pair(pair, main: Path):
    options = ExtractOptions(base=pair[0], variant=pair[1], out=main, checkpoint=True, detail=True, overwrite=True)
    return extract(options, log=quiet)
