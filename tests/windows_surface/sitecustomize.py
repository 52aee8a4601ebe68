"""Test-only: make this Linux Python's ``os`` look like Windows' (issue 9, lane a).

Put this folder on PYTHONPATH (tests/windows_surface/run.sh does) and every Python
process started with it, the CLI subprocesses the tests start included, loses the
functions that Windows' ``os`` module does not have. Engine code that calls one of them
then fails here with AttributeError, as it would for a Windows user.

The list is the "Availability: Unix" functions of the ``os`` docs (Python 3.10-3.13),
those this codebase or its tests could plausibly reach. ``fchmod`` is listed although
3.13 added it on Windows: the engine supports 3.10-3.12 there.

Kept on purpose, each because the interpreter or pytest needs it on Linux and no engine
code calls it:
* ``WIFSTOPPED``/``WSTOPSIG`` and the other ``W*`` status macros: ``subprocess`` (its
  POSIX half) binds them at import;
* ``statvfs``: ``shutil.disk_usage`` exists on POSIX only through it (on Windows it uses
  ``nt._getdiskusage``); the engine's free-space check calls ``shutil.disk_usage``;
* ``register_at_fork``: torch's import calls it off Windows;
* ``sysconf``/``confstr``: psutil's Linux half (imported by transformers/diffusers in
  the loader tests) calls them at import;
* ``uname``: numpy's import calls it on Linux (to decide on huge pages);
* ``getuid`` is removed, but pytest needs it for its default temporary folder: run.sh
  passes ``--basetemp`` so pytest never asks.
"""

from __future__ import annotations

import os

try:
    import posix
except ImportError:  # a real Windows Python: nothing to do
    posix = None

WINDOWS_LACKS = (
    # positioned and vectored I/O
    "pread", "preadv", "pwrite", "pwritev", "readv", "writev", "sendfile", "splice", "copy_file_range",
    "posix_fallocate", "posix_fadvise", "fdatasync", "sync", "lockf",
    # ownership and permissions by descriptor or link
    "fchmod", "fchown", "chown", "lchown", "lchmod", "chflags", "lchflags", "fchdir", "chroot",
    # users, groups, sessions, process groups
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups", "getgrouplist",
    "setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "initgroups", "getpgid", "setpgid", "getpgrp", "setpgrp", "getsid", "setsid", "killpg",
    "tcgetpgrp", "tcsetpgrp", "ctermid", "ttyname", "openpty", "forkpty", "login_tty",
    # processes
    "fork", "wait", "wait3", "wait4", "waitid", "posix_spawn", "posix_spawnp",
    "nice", "getpriority", "setpriority", "pidfd_open", "setns", "unshare",
    "sched_getaffinity", "sched_setaffinity", "sched_yield", "sched_get_priority_max",
    "sched_get_priority_min", "sched_getparam", "sched_setparam", "sched_getscheduler",
    "sched_setscheduler", "sched_rr_get_interval",
    # file system odds
    "mkfifo", "mknod", "major", "minor", "makedev", "pathconf", "fpathconf", "fstatvfs",
    "getxattr", "setxattr", "listxattr", "removexattr", "memfd_create", "eventfd", "eventfd_read",
    "eventfd_write", "pipe2",
    # system information
    "getloadavg", "getrandom",
)

REMOVED = []
for _name in WINDOWS_LACKS:
    for _module in (os, posix):
        if _module is not None and hasattr(_module, _name):
            delattr(_module, _name)
            if _module is os:
                REMOVED.append(_name)
os.environ["CKPT2LORA_WINDOWS_SURFACE"] = "1"  # children inherit PYTHONPATH; this marks the lane
