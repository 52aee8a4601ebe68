"""Serve the stub WebUI's page for the browser test: a txt2img tab, then the extension's tabs.

    python webui_server.py WORKDIR PORT

The txt2img tab holds what the real one has for our purposes: the prompt
(#txt2img_prompt) and the Lora cards' hidden refresh button
(#txt2img_lora_extra_refresh_internal), the seed and size Compare reads, plus an "echo" event that reads the prompt back
from gradio's state, to prove the page's value reached gradio.
"""

from __future__ import annotations

import sys
from pathlib import Path

from webui_boot import boot


def main(workdir: Path, port: int) -> None:
    import gradio as gr

    _, interfaces = boot(workdir)
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion (stub)") as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
                prompt = gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=3)
                # What Compare reads, with A1111's element ids (ui.py / ui_toprow.py).
                gr.Number(label="Seed", value=77, elem_id="txt2img_seed", precision=0)
                gr.Slider(label="Width", minimum=64, maximum=2048, step=8, value=96, elem_id="txt2img_width")
                gr.Slider(label="Height", minimum=64, maximum=2048, step=8, value=64, elem_id="txt2img_height")
                refresh = gr.Button("Refresh", elem_id="txt2img_lora_extra_refresh_internal")
                echo_button = gr.Button("Echo", elem_id="echo_button")
                echo = gr.Textbox(label="Echo", elem_id="echo")
                refreshed = gr.Textbox(label="Refreshed", elem_id="refreshed")
                refresh.click(fn=lambda: "yes", inputs=[], outputs=[refreshed])
                echo_button.click(fn=lambda text: text, inputs=[prompt], outputs=[echo])
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
