"""The documented library entry point stays what it is: ``from lib_ckpt2lora import
ExtractOptions, extract`` gives the extract *function*, whatever was imported or called
before. The package's attribute ``extract`` is contested: importing the submodule
``lib_ckpt2lora.extract`` binds the module to it, and ``__init__``'s ``from .extract import
extract`` rebinds it to the function afterwards; these checks keep the function winning.
Each runs in a fresh interpreter (pytest's own sys.modules is shared)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BEFORE = {
    "nothing": "",
    # a call through the package attribute, then a fresh import of the name
    "one call of lib_ckpt2lora.extract": (
        "from lib_ckpt2lora import ExtractOptions, UserError\n"
        "try:\n"
        "    lib_ckpt2lora.extract(ExtractOptions(base='/nonexistent/b.safetensors', "
        "variant='/nonexistent/v.safetensors', out='/nonexistent/o.safetensors'))\n"
        "except UserError:\n"
        "    pass\n"
    ),
    "import lib_ckpt2lora.extract": "import lib_ckpt2lora.extract\n",
}


@pytest.mark.parametrize("before", list(BEFORE))
def test_extract_is_the_function(before):
    code = (
        "import lib_ckpt2lora\n"
        + BEFORE[before]
        + "from lib_ckpt2lora import extract\n"
        + "assert callable(extract), f'lib_ckpt2lora.extract is {extract!r}'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr.strip().splitlines()[-1]
