"""Headless Chromium (Debian's, driven by Playwright) against the real pages.

1. The standalone app (python -m lib_ckpt2lora.ui): choose the models, Extract, see
   gradio's progress with the current layer, then the table and the chart; the LoRA and
   its sidecar are on disk.
2. The stub WebUI's page (a txt2img tab, then the extension's tab, as A1111 renders it)
   with javascript/ckpt2lora.js: Extract sends the WebUI's task id, then "Send to txt2img"
   puts <lora:NAME:1> into the txt2img prompt, in gradio's state too.
3. javascript/ckpt2lora.js in a plain page holding the WebUI's element ids: the tag is
   appended once (never toggled), the tab switched, the Lora cards refreshed.

Set CKPT2LORA_SCREENSHOT=path.png to save a screenshot of the tab after the extraction.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from uihelpers import write_pair

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api as playwright_api  # in both UI environments: no silent skip

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tmp_path):
    models, loras = tmp_path / "checkpoints", tmp_path / "loras"
    write_pair(models, "base.safetensors", "tuned.safetensors")
    loras.mkdir()
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "lib_ckpt2lora.ui", "--models-dir", str(models), "--lora-dir", str(loras),
         "--port", str(port), "--layer-delay", "0.1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.close()
                    pytest.fail("the standalone app did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.3)
        yield type("App", (), {"url": url, "loras": loras, "models": models})
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def choose(page, dropdown: str, option: str, prefix: bool = False) -> None:
    page.click(f"#{dropdown} input")
    page.click(f"#{dropdown} li[aria-label{'^' if prefix else ''}='{option}']")


def test_standalone_app_extracts_with_progress_table_and_chart(browser, app):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(app.url)
    page.wait_for_selector("#ckpt2lora_base input")
    choose(page, "ckpt2lora_base", "base.safetensors")
    choose(page, "ckpt2lora_variant", "tuned.safetensors")
    page.wait_for_function("document.querySelector('#ckpt2lora_name textarea').value === 'tuned'")

    page.click("#ckpt2lora_extract")
    # gradio's own progress, naming the layer under way
    progress = page.wait_for_selector("#ckpt2lora_status .progress-level-inner:has-text('Extracting')", timeout=60_000)
    assert "model.diffusion_model." in progress.inner_text() or "cond_stage_model" in progress.inner_text()
    # then the result: status, table, chart
    page.wait_for_selector("#ckpt2lora_status .ckpt2lora-ok", timeout=120_000)
    status = page.inner_text("#ckpt2lora_status")
    assert "Saved the LoRA" in status and "tuned.safetensors" in status
    table = page.wait_for_selector("#ckpt2lora_table")
    assert table.is_visible()
    text = table.inner_text()
    for column in ("Level", "Type", "rank", "S_max", "S_min", "ratio", "energy"):
        assert column in text
    assert "Total" in text and "IN-1" in text
    bars = page.query_selector_all("#ckpt2lora_chart svg rect.ckpt2lora-bar")
    assert len(bars) >= 4
    assert page.query_selector("#ckpt2lora_chart svg polyline.ckpt2lora-energy") is not None

    assert (app.loras / "tuned.safetensors").is_file()
    assert json.loads((app.loras / "tuned.json").read_text())["sd version"] == "SD1"
    assert sorted(p.name for p in app.loras.iterdir()) == ["tuned.json", "tuned.safetensors"]

    shot = os.environ.get("CKPT2LORA_SCREENSHOT")
    if shot:
        page.evaluate("document.querySelector('#ckpt2lora_name textarea').blur()")
        page.screenshot(path=shot, full_page=True)

    # A second Extract with the same name: one clear sentence in the tab, nothing overwritten.
    size = (app.loras / "tuned.safetensors").stat().st_size
    page.click("#ckpt2lora_extract")
    error = page.wait_for_selector("#ckpt2lora_status .ckpt2lora-error", timeout=60_000)
    assert "already exists" in error.inner_text()
    assert (app.loras / "tuned.safetensors").stat().st_size == size
    page.close()


def test_stop_button_in_the_browser(browser, app):
    page = browser.new_page()
    page.goto(app.url)
    page.wait_for_selector("#ckpt2lora_base input")
    choose(page, "ckpt2lora_base", "base.safetensors")
    choose(page, "ckpt2lora_variant", "tuned.safetensors")
    page.click("#ckpt2lora_extract")
    page.wait_for_selector("#ckpt2lora_status .progress-level-inner:has-text('Extracting')", timeout=60_000)
    page.click("#ckpt2lora_stop")
    page.wait_for_selector("#ckpt2lora_status .ckpt2lora-stopped", timeout=60_000)
    assert "nothing was written" in page.inner_text("#ckpt2lora_status")
    assert list(app.loras.iterdir()) == []
    page.close()


WEBUI_PAGE = """<!doctype html><html><body>
<div id="tabs"><div><button id="t2i">txt2img</button><button id="ours" class="selected">ckpt2lora</button></div></div>
<div id="txt2img_prompt"><label><textarea>a photo of a cat</textarea></label></div>
<button id="txt2img_lora_extra_refresh_internal" style="display:none">Refresh</button>
<script>
  // Stand-ins for the WebUI's own globals (script.js, ui.js, progressbar.js).
  window.calls = {inputs: 0, switched: 0, refreshed: 0, progress: []};
  function gradioApp() { return document; }
  function updateInput(el) { el.dispatchEvent(new Event("input", {bubbles: true})); }
  function switch_to_txt2img() { gradioApp().querySelector('#tabs').querySelectorAll('button')[0].click(); }
  function randomId() { return "task(fixed)"; }
  function requestProgress(id, container, gallery, atEnd) { calls.progress.push([id, container.id]); }
  function selectCheckpoint(name) { calls.checkpoint = name; }
  document.querySelector('#txt2img_prompt textarea').addEventListener('input', () => calls.inputs++);
  document.querySelector('#t2i').addEventListener('click', () => calls.switched++);
  document.querySelector('#txt2img_lora_extra_refresh_internal').addEventListener('click', () => calls.refreshed++);
</script>
<div id="ckpt2lora_status"></div>
<div id="ckpt2lora_compare_status"></div>
</body></html>"""


def test_send_to_txt2img_script(browser):
    page = browser.new_page()
    page.set_content(WEBUI_PAGE)
    page.add_script_tag(path=str(ROOT / "javascript" / "ckpt2lora.js"))
    prompt = "#txt2img_prompt textarea"

    page.evaluate("ckpt2lora.sendToTxt2img('my_lora')")
    assert page.input_value(prompt) == "a photo of a cat <lora:my_lora:1>"
    calls = page.evaluate("calls")
    assert calls["inputs"] == 1 and calls["switched"] == 1 and calls["refreshed"] == 1

    page.evaluate("ckpt2lora.sendToTxt2img('my_lora')")  # again: not toggled off, not doubled
    assert page.input_value(prompt) == "a photo of a cat <lora:my_lora:1>"

    page.fill(prompt, "x, <lora:other:0.5>, <lora:my_lora:0.7>")
    page.evaluate("ckpt2lora.sendToTxt2img('my_lora')")  # the user's own weight is kept
    assert page.input_value(prompt) == "x, <lora:other:0.5>, <lora:my_lora:0.7>"

    page.fill(prompt, "")
    page.evaluate("ckpt2lora.sendToTxt2img('a.b (c)')")
    assert page.input_value(prompt) == "<lora:a.b (c):1>"

    page.fill(prompt, "trailing, ")
    page.evaluate("ckpt2lora.sendToTxt2img('z')")
    assert page.input_value(prompt) == "trailing, <lora:z:1>"

    page.evaluate("ckpt2lora.selectCheckpoint('new.safetensors [0123456789]')")
    assert page.evaluate("calls.checkpoint") == "new.safetensors [0123456789]"
    # Send to txt2img with "also load the base model" ticked selects the base; unticked, not.
    page.evaluate("ckpt2lora.sendToTxt2img('z', 'base.safetensors [abc]', true)")
    assert page.evaluate("calls.checkpoint") == "base.safetensors [abc]"
    page.evaluate("ckpt2lora.sendToTxt2img('z', 'other.safetensors [def]', false)")
    assert page.evaluate("calls.checkpoint") == "base.safetensors [abc]"

    submitted = page.evaluate("ckpt2lora.submit(['', 'base', 'variant', 'extra output'], 3)")
    assert submitted == ["task(fixed)", "base", "variant"]
    assert page.evaluate("calls.progress") == [["task(fixed)", "ckpt2lora_status"]]
    # Compare: the task id, and the txt2img prompt as JSON (fields the page lacks are null).
    sent = page.evaluate("ckpt2lora.compare(['', '', 'lora', 'base', 'variant'], 5)")
    assert sent[0] == "task(fixed)" and sent[2:] == ["lora", "base", "variant"]
    assert json.loads(sent[1])["prompt"] == "trailing, <lora:z:1>" and json.loads(sent[1])["seed"] is None
    assert page.evaluate("calls.progress")[-1] == ["task(fixed)", "ckpt2lora_compare_status"]
    page.close()


# Stand-ins for the WebUI's own globals (script.js, ui.js, progressbar.js) that the tab's
# script calls; the WebUI's page defines them, the stub's page does not.
WEBUI_GLOBALS = """
window.__progress = [];
function gradioApp() { return document; }
function updateInput(target) {
    var e = new Event("input", {bubbles: true});
    Object.defineProperty(e, "target", {value: target});
    target.dispatchEvent(e);
}
function switch_to_txt2img() { gradioApp().querySelector("#tabs").querySelectorAll("button")[0].click(); }
function randomId() { return "task(browser)"; }
function requestProgress(id, container, gallery, atEnd) { window.__progress.push([id, container.id]); }
function selectCheckpoint(name) { window.__checkpoint = name; }
"""


@pytest.fixture
def webui_page(tmp_path):
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    log = open(tmp_path / "server.log", "w")
    here = Path(__file__).resolve().parent
    server = subprocess.Popen(
        [sys.executable, str(here / "webui_server.py"), str(tmp_path), str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.close()
                    pytest.fail("the stub WebUI did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.3)
        yield type("Page", (), {"url": url, "loras": tmp_path / "models" / "Lora"})
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_webui_page_extract_then_send_to_txt2img(browser, webui_page):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(webui_page.url)
    # Classic <script> tags, global scope, as the WebUI loads its and extensions' scripts.
    page.add_script_tag(content=WEBUI_GLOBALS)
    page.add_script_tag(path=str(ROOT / "javascript" / "ckpt2lora.js"))
    page.click("#tabs button:has-text('ckpt2lora')")
    choose(page, "ckpt2lora_base", "sd15_base.safetensors [", prefix=True)
    choose(page, "ckpt2lora_variant", "sd15_finetune.safetensors [", prefix=True)
    page.wait_for_function("document.querySelector('#ckpt2lora_name textarea').value === 'sd15_finetune'")
    page.click("#ckpt2lora_extract")
    page.wait_for_selector("#ckpt2lora_status .ckpt2lora-ok", timeout=120_000)
    # The WebUI's progress bar was asked for, with the task id the job ran under.
    assert page.evaluate("window.__progress") == [["task(browser)", "ckpt2lora_status"]]
    assert (webui_page.loras / "sd15_finetune.safetensors").is_file()
    assert page.is_visible("#ckpt2lora_table") and page.is_visible("#ckpt2lora_chart svg")

    page.click("#ckpt2lora_send_txt2img")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === '<lora:sd15_finetune:1>'")
    assert page.is_visible("#txt2img_prompt textarea")  # switched to txt2img
    page.wait_for_function("document.querySelector('#refreshed textarea').value === 'yes'")  # Lora cards refreshed
    page.click("#echo_button")  # what txt2img would send to the server
    page.wait_for_function("document.querySelector('#echo textarea').value === '<lora:sd15_finetune:1>'")
    assert page.evaluate("window.__checkpoint").startswith("sd15_base.safetensors [")  # the base is loaded

    # Compare, from the tab: the txt2img seed and size, both images, the figures.
    page.click("#tabs button:has-text('ckpt2lora')")
    page.click("#ckpt2lora_compare")
    page.wait_for_selector("#ckpt2lora_compare_status .ckpt2lora-similarity", timeout=60_000)
    text = page.inner_text("#ckpt2lora_compare_status")
    assert "Seed 77" in text and "SSIM" in text and "mean absolute pixel difference" in text
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#ckpt2lora_compare_view img')).filter(i => i.naturalWidth === 96).length === 2"
    )
    assert page.is_visible("#ckpt2lora_compare_view img")
    page.close()
