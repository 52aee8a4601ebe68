"""Helpers for the bad-input, interruption and output-safety tests (issue #6).

Every failure a user can cause must end, on the CLI, in exit code 2 (130 when
interrupted) with one sentence on stderr and no traceback, and must leave the output
folder exactly as it was: no output, no ``.<name>.*.part`` temporary, and an existing
file untouched byte for byte. These helpers run the CLI in subprocesses (several at
once, since each one spends most of its time importing torch), build small valid and
damaged model files, and compare folder snapshots.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ERROR_PREFIX = "ckpt2lora: "
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- running the CLI -------------------------------------------------------------------------
def cli_command(args: Sequence[object]) -> list[str]:
    return [sys.executable, "-m", "lib_ckpt2lora", *(str(arg) for arg in args)]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("CUDA_VISIBLE_DEVICES", "")  # the same path on every machine, and no GPU start-up cost
    # One compute thread: on a busy 2-core machine MKL's threads spin-wait for each other
    # and a tiny model's first SVDs cost seconds; these tests are about errors, not speed.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


@contextlib.contextmanager
def one_torch_thread():
    """In-process runs with one compute thread (see ``cli_env``), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_cli(args: Sequence[object], timeout: float = 180, prefix: Sequence[str] = (), **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, *cli_command(args)], capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=ROOT, **kwargs
    )


def permission_bits_prefix(scratch: Path) -> list[str] | None:
    """A command prefix under which file permission bits hold for this user: none needed
    for a normal user; for root, ``setpriv`` dropping the capabilities that let root read
    and write through them. None where that is not possible here (the caller skips)."""
    if not IS_ROOT:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if not shutil.which("setpriv"):
        return None
    probe = scratch / "permission_probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        result = subprocess.run([*prefix, "sh", "-c", f"! test -r '{probe}'"], capture_output=True)
    except OSError:
        return None
    finally:
        probe.unlink()
    return prefix if result.returncode == 0 else None


def run_cli_many(jobs: dict[str, Sequence[object]], workers: int = 3, **kwargs) -> dict[str, subprocess.CompletedProcess]:
    """Run several CLI invocations at once (each is mostly torch's import time)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run_cli, args, **kwargs) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def run_cli_inprocess(args: Sequence[object]) -> subprocess.CompletedProcess:
    """``cli.main(args)`` in this process, as a finished process would report it: an
    exception that escapes ``main`` becomes a traceback on stderr and exit code 1.

    Much faster than a subprocess (no torch import); used for most cases, with a
    representative few also run for real. Restores this process's signal handlers."""
    import io
    import signal
    import traceback

    from lib_ckpt2lora.cli import main

    argv = [str(arg) for arg in args]
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


def error_lines(stderr: str) -> list[str]:
    return [line[len(ERROR_PREFIX) :] for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]


def assert_one_sentence(message: str) -> None:
    """One line, one sentence: ends with a full stop (or a question mark), no second
    sentence starts inside it, no terminal escape codes."""
    assert message and "\n" not in message, repr(message)
    assert "\x1b" not in message, f"terminal escape codes: {message!r}"
    assert message.rstrip().endswith((".", "?")), f"not a sentence: {message!r}"
    assert not re.search(r"[.!?]\s+[A-Z]", message.rstrip()[:-1]), f"more than one sentence: {message!r}"
    assert len(message) < 600, f"too long for one sentence: {message!r}"


def assert_clean_failure(proc: subprocess.CompletedProcess, *mentions: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, exactly one ``ckpt2lora: <sentence>`` line naming ``mentions``."""
    assert proc.returncode == code, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, describe(proc)
    message = lines[0]
    assert_one_sentence(message)
    for mention in mentions:
        assert mention in message, f"{mention!r} not named in: {message!r}"
    return message


def assert_success(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert not error_lines(proc.stderr), describe(proc)


# -- folders ---------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too) with its content hash."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            entries[name] = "link:" + os.readlink(path)
        elif path.is_dir():
            entries[name] = "<dir>"
        else:
            entries[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def temp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.part"))


def out_folder(parent: Path, name: str) -> Path:
    """An output folder holding one unrelated file, so 'unchanged' means something."""
    folder = parent / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keep.txt").write_text("not ours\n")
    return folder


# -- model files -----------------------------------------------------------------------------
def small_pair(cache: Path) -> tuple[Path, Path]:
    """The demo's Z-Image-layout pair at width 64, one block (built once per session)."""
    from lib_ckpt2lora.demo import make_pair

    folder = cache / "pair64"
    base, variant = folder / "demo_base.safetensors", folder / "demo_variant.safetensors"
    if not (base.exists() and variant.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        make_pair(folder, dim=64, blocks=1)
    return base, variant


def slow_pair(cache: Path, dim: int = 512, blocks: int = 6) -> tuple[Path, Path]:
    """A Z-Image-layout pair big enough that ``--svd exact`` takes several seconds.

    Cheaper to build than the demo's pair: the variant is the base plus dense noise."""
    from safetensors.torch import save_file

    from lib_ckpt2lora.demo import zimage_shapes

    folder = cache / f"slow{dim}x{blocks}"
    base_path, variant_path = folder / "slow_base.safetensors", folder / "slow_variant.safetensors"
    if base_path.exists() and variant_path.exists():
        return base_path, variant_path
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    base, variant = {}, {}
    for key, shape in zimage_shapes(dim, blocks).items():
        weight = torch.randn(shape, generator=generator) * 0.02
        base[key] = weight.to(torch.bfloat16)
        if len(shape) == 2 and min(shape) > 1:
            weight = weight + 0.002 * torch.randn(shape, generator=generator)
        variant[key] = weight.to(torch.bfloat16)
    save_file(base, str(base_path))
    save_file(variant, str(variant_path))
    return base_path, variant_path


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_state(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of safetensors bytes."""
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_safetensors(header: object, data: bytes, header_len: int | None = None) -> bytes:
    """Safetensors bytes from a header (any JSON value, or raw bytes) and a data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    length = len(raw) if header_len is None else header_len
    return struct.pack("<Q", length) + raw + data


def edit_header(path: Path, target: Path, change: Callable[[dict], object], data: bytes | None = None) -> Path:
    """Copy ``path`` to ``target`` with its header passed through ``change`` (in place or returned)."""
    header, section = split_safetensors(path.read_bytes())
    changed = change(header)
    target.write_bytes(join_safetensors(header if changed is None else changed, section if data is None else data))
    return target


def tiny_safetensors_bytes() -> bytes:
    """A small valid file: three tensors of three dtypes, with metadata."""
    from safetensors.torch import save

    tensors = {
        "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b.weight": torch.ones(2, 2, dtype=torch.float16),
        "c": torch.tensor([1, 2, 3], dtype=torch.int64),
    }
    return save(tensors, metadata={"note": "tiny"})


def sd15_like(path: Path, seed: int = 0) -> Path:
    """A tiny file that detection takes for SD1.5: ldm UNet and CLIP key names, small shapes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": (32,),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 768),
        "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (64, 48),
    }
    return save_state({k: torch.randn(s, generator=generator).to(torch.float16) for k, s in shapes.items()}, path)


def copy(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    return target
