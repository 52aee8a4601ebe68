"""Writing safetensors files: streamed, atomic, never over an existing file unasked.

The writer lays out the header from known names, dtypes and shapes, then streams each
tensor's bytes in order, so a checkpoint is never held in memory whole. Output goes to
a hidden temporary file in the target folder and is renamed into place only when
complete: an error or an interrupt leaves nothing behind. Files that belong together
(a LoRA and its detail LoRA) are renamed together, all or nothing (``output_group``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path

import torch

from .errors import UserError
from .reading import DTYPE_NAMES, read_into

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ALIGNMENT = 8


def check_output_path(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, if the output cannot or must not be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another name or pass --overwrite.")
    if path.is_dir():
        raise UserError(f"The output {path} is a folder; give a file name ending in .safetensors.")
    if not folder.is_dir():
        raise UserError(f"The output folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK):
        raise UserError(f"The output folder {folder} is not writable; choose another folder.")


class OutputGroup:
    """Files that must land together (a LoRA and its detail LoRA): all or nothing.

    Each file is written complete under a temporary name first; ``commit`` then renames
    them into place. If a rename fails, the files already renamed are put back as they
    were (a replaced file from the backup made just before), so either every new file is
    in place or every old one is untouched."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.staged: list[tuple[Path, Path]] = []  # (temporary file, final path)

    def add(self, temp: Path, path: Path) -> None:
        self.staged.append((temp, path))

    def commit(self) -> None:
        for _, path in self.staged:
            if path.exists() and not self.overwrite:
                raise UserError(f"{path} appeared while writing and was left untouched; choose another name.")
        done: list[tuple[Path, Path | None]] = []  # renamed into place: (path, backup of the old file)
        last, path = len(self.staged) - 1, None
        try:
            for index, (temp, path) in enumerate(self.staged):
                # The last rename needs no backup: when it fails, it has changed nothing.
                backup = _move_aside(path) if index < last and path.exists() else None
                try:
                    _replace(temp, path)
                except BaseException:
                    if backup is not None:
                        with contextlib.suppress(OSError):
                            os.replace(backup, path)
                    raise
                done.append((path, backup))
        except BaseException as exc:
            for placed, backup in reversed(done):  # put the earlier ones back as they were
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, placed)
                    else:
                        placed.unlink()
            if isinstance(exc, OSError):
                raise _disk_error(exc, path) from None
            raise
        finally:
            self.discard()
        for _, backup in done:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()

    def discard(self) -> None:
        for temp, _ in self.staged:
            with contextlib.suppress(OSError):
                temp.unlink()
        self.staged.clear()


@contextlib.contextmanager
def output_group(overwrite: bool) -> Iterator[OutputGroup]:
    """Write several files inside; they are put in place together when the block ends."""
    group = OutputGroup(overwrite)
    try:
        yield group
        group.commit()
    finally:
        group.discard()


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool, group: OutputGroup | None = None) -> Iterator[tuple[Path, object]]:
    """Yield (temporary path, binary handle); rename to ``path`` only on success (or, in a
    ``group``, hand the complete temporary file to the group, which renames it later)."""
    check_output_path(path, overwrite)
    handle = None
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise UserError(f"Cannot create a file in {path.parent} ({exc.strerror}); choose another folder.") from None
    temp = Path(temp_name)
    kept = False
    try:
        handle = os.fdopen(fd, "wb")
        set_usual_permissions(temp)
        yield temp, handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        handle = None
        if group is not None:
            group.add(temp, path)
            kept = True
        else:
            if path.exists() and not overwrite:
                raise UserError(f"{path} appeared while writing and was left untouched; choose another name.")
            _replace(temp, path)
    except OSError as exc:
        raise _disk_error(exc, path) from None
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()
        if not kept:
            with contextlib.suppress(OSError):
                temp.unlink()


# How long a refused rename is retried: on Windows an antivirus scan, the search indexer or
# a sync client opens a new or replaced file for a moment; a program that has the file
# loaded holds it for good, and the run then ends in one sentence.
REPLACE_RETRY_SECONDS = 2.0


def _replace(source: Path, path: Path) -> None:
    """os.replace, retried for a moment while it is refused (PermissionError), then the
    refusal said in one sentence: Windows refuses to replace a file another program holds
    open (WinError 5 or 32), every system a folder that is read-only for us."""
    delay, deadline = 0.05, time.monotonic() + REPLACE_RETRY_SECONDS
    while True:
        try:
            os.replace(source, path)
            return
        except PermissionError as exc:
            if time.monotonic() + delay > deadline:
                raise _refused(exc, path) from None
        time.sleep(delay)
        delay = min(2 * delay, 0.5)


def _refused(exc: PermissionError, path: Path) -> UserError:
    held = getattr(exc, "winerror", None) in (5, 32) or os.name == "nt"
    if held and path.exists():
        return UserError(
            f"{path} is in use by another program (the WebUI may have it loaded) and cannot be replaced; "
            "close that program's use of it, or choose another name (nothing was changed)."
        )
    return UserError(
        f"Cannot write {path.name} into {path.parent}: the folder is read-only or not yours to change; "
        "choose another folder (nothing was changed)."
    )


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to a hidden backup beside it (restored if a later rename fails)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".previous", dir=path.parent)
    os.close(fd)
    backup = Path(name)
    try:
        _replace(path, backup)
    except BaseException:
        with contextlib.suppress(OSError):
            backup.unlink()
        raise
    return backup


def set_usual_permissions(path: Path, mode: int | None = None) -> None:
    """``mode``, or else the permissions a plain ``open()`` would give (mkstemp makes the
    file private).

    POSIX only: on Windows a mode sets only the read-only flag, and the file already has
    its folder's ACLs. ``os.chmod`` by path, since ``os.fchmod`` is missing on Windows
    before Python 3.13."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError, NotImplementedError):
        os.chmod(path, 0o666 & ~_umask() if mode is None else mode)


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_error(exc: OSError, path: Path) -> UserError:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return UserError(f"Ran out of disk space writing {path}; free some space and run again (nothing was written).")
    return UserError(f"Could not write {path} ({exc.strerror or exc}); nothing was written.")


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included) and each tensor's byte size."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        size = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            size *= dim
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw, sizes


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def write_streamed(
    path: Path,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[int, str], torch.Tensor],
    metadata: dict[str, str],
    overwrite: bool,
    before_rename: Callable[[], None] | None = None,
    group: OutputGroup | None = None,
) -> None:
    """Write tensors one at a time: ``produce(i, name)`` returns entry i, already cast.

    ``before_rename`` may raise to abandon a complete file (e.g. it holds no change)."""
    header, sizes = build_header(entries, metadata)
    with atomic_file(path, overwrite, group) as (_, handle):
        handle.write(header)
        for index, (name, dtype, shape) in enumerate(entries):
            tensor = produce(index, name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"internal: {name} produced {tensor.dtype} {tuple(tensor.shape)}")
            data = tensor_bytes(tensor)
            if data.nbytes != sizes[index]:
                raise RuntimeError(f"internal: {name} has {data.nbytes} bytes, expected {sizes[index]}")
            handle.write(data)
        if before_rename is not None:
            before_rename()


def write_tensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    overwrite: bool,
    with_hash: bool = True,
    group: OutputGroup | None = None,
) -> None:
    """Write small tensors held in memory (a LoRA); add ``sshs_model_hash`` when asked.

    The hash is the SHA-256 of the data section after the header, which is what A1111
    computes and trusts for a LoRA's identity.
    """
    names = sorted(tensors)
    entries = _entries(tensors)
    metadata = dict(metadata)
    if with_hash:
        digest = hashlib.sha256()
        for name in names:
            digest.update(tensor_bytes(tensors[name]))
        metadata["sshs_model_hash"] = digest.hexdigest()
    write_streamed(path, entries, lambda index, name: tensors[name], metadata, overwrite, group=group)


def tensors_file_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str], with_hash: bool = True) -> int:
    """The exact size of the file ``write_tensors`` would write, without writing it."""
    metadata = dict(metadata)
    if with_hash:
        metadata["sshs_model_hash"] = "0" * 64  # a SHA-256 in hex: always 64 characters
    header, sizes = build_header(_entries(tensors), metadata)
    return len(header) + sum(sizes)


def write_all(outputs: list[tuple[Path, dict[str, torch.Tensor], dict[str, str]]], overwrite: bool) -> None:
    """Write several files all or nothing: each under a temporary name, then all renamed
    together; a failure at any point leaves the user's old files (--overwrite) untouched."""
    with output_group(overwrite) as group:
        for path, tensors, metadata in outputs:
            write_tensors(path, tensors, metadata, overwrite, group=group)


def _entries(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(name, *tensor_info(tensors, name)) for name in sorted(tensors)]


def tensor_info(tensors: dict[str, torch.Tensor], name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """A collected tensor's dtype and shape; a spilled one is not read back for it."""
    if isinstance(tensors, SpilledTensors):
        return tensors.info(name)
    return tensors[name].dtype, tuple(tensors[name].shape)


# A LoRA's tensors of this size or more wait in a temporary file, not in memory (SpilledTensors).
SPILL_MIN_BYTES = 1 << 16


class SpilledTensors(MutableMapping):
    """A LoRA's tensors as a run collects them, those of SPILL_MIN_BYTES or more kept in a
    temporary file in the output's folder rather than in memory, read back one at a time
    when the LoRA is written: a 40-block Wan 14B LoRA (~700 MB of factors) would otherwise
    sit in memory until the end, on top of the layer being computed.

    The file is anonymous (``tempfile.TemporaryFile``: unlinked at once on POSIX, deleted
    on close on Windows, even when the process is killed), so a failure or an interrupt
    leaves nothing behind; ``close`` frees its space at once. Should the folder refuse the
    file (or fill up), tensors simply stay in memory: the output's own write then says
    what is wrong."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._entries: dict[str, torch.Tensor | tuple[int, torch.dtype, tuple[int, ...]]] = {}
        self._file = None
        self._refused = folder is None

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        self._entries[name] = tensor
        if data.nbytes < SPILL_MIN_BYTES or self._refused:
            return
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix=".ckpt2lora-", suffix=".spill", dir=self.folder)
            offset = self._file.seek(0, os.SEEK_END)
            self._file.write(data)
        except OSError:
            self._refused = True  # kept in memory from now on
            return
        self._entries[name] = (offset, tensor.dtype, tuple(tensor.shape))

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        if isinstance(entry, torch.Tensor):
            return entry
        offset, dtype, shape = entry
        tensor = torch.empty(shape, dtype=dtype)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        try:
            self._file.seek(offset)
            done = read_into(self._file, buffer)
        except OSError as exc:  # e.g. the disk filled up while the spill was being written
            raise UserError(
                f"Could not read back the LoRA's factors kept in a temporary file in {self.folder} "
                f"({exc.strerror or exc}); free some disk space there and run again (nothing was written)."
            ) from None
        if done < len(buffer):
            raise UserError(f"The temporary file of the LoRA's factors in {self.folder} was cut short; run again.")
        return tensor

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """A tensor's dtype and shape, without reading it back."""
        entry = self._entries[name]
        if isinstance(entry, torch.Tensor):
            return entry.dtype, tuple(entry.shape)
        return entry[1], entry[2]

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Drop every tensor and the temporary file."""
        self._entries.clear()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None
