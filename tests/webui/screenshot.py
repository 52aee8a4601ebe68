"""Make docs/tab.png: the tab (standalone app) after extracting the demo Z-Image-layout pair.

    .venv-gradio4/bin/python tests/webui/screenshot.py [OUT.png]

Needs Debian's chromium (and, for the refresh button's emoji, fonts-noto-color-emoji).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from test_browser import CHROMIUM, CHROMIUM_ARGS, choose, free_port  # noqa: E402

from lib_ckpt2lora.demo import make_pair  # noqa: E402


def main(out: Path) -> None:
    work = Path(tempfile.gettempdir()) / "ckpt2lora-demo"
    shutil.rmtree(work, ignore_errors=True)
    models, loras = work / "models" / "checkpoints", work / "models" / "loras"
    loras.mkdir(parents=True)
    (work / "pair").mkdir()
    base, variant = make_pair(work / "pair")
    models.mkdir(parents=True)
    shutil.move(base, models / "z_image_turbo_demo.safetensors")
    shutil.move(variant, models / "my_finetune_demo.safetensors")
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "lib_ckpt2lora.ui", "--models-dir", str(models), "--lora-dir", str(loras), "--port", str(port)],
        cwd=work,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(300):
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                time.sleep(0.3)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#ckpt2lora_base input")
            choose(page, "ckpt2lora_base", "z_image_turbo_demo.safetensors")
            choose(page, "ckpt2lora_variant", "my_finetune_demo.safetensors")
            page.click("#ckpt2lora_extract")
            page.wait_for_selector("#ckpt2lora_status .ckpt2lora-ok", timeout=300_000)
            page.evaluate("document.activeElement && document.activeElement.blur()")
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "tab.png")
