"""The tab as a gradio app, for people without the WebUI (ComfyUI users, servers).

python -m lib_ckpt2lora.ui --models-dir models/checkpoints --lora-dir models/loras
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The tab's styles: the WebUIs load only the repository's root style.css, so that is the one
# copy; a pip install puts it under <prefix>/share/ckpt2lora (pyproject's data-files).
CSS_FILES = (ROOT / "style.css", Path(sys.prefix) / "share" / "ckpt2lora" / "style.css")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lib_ckpt2lora.ui",
        description="Serve the ckpt2lora tab as a standalone gradio app. Needs gradio 4.40.0 (or 3.41.2): "
        'pip install "ckpt2lora[ui]", or in a clone: pip install -r requirements-ui-gradio4.txt.',
    )
    parser.add_argument(
        "--models-dir",
        required=True,
        type=Path,
        help="folder with the checkpoints (searched recursively); checkpoints are saved here",
    )
    parser.add_argument("--lora-dir", required=True, type=Path, help="folder with the LoRAs; LoRAs are saved here")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7861, help="port (default 7861)")
    parser.add_argument("--layer-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # demos and tests
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for label, folder in (("--models-dir", args.models_dir), ("--lora-dir", args.lora_dir)):
        if not folder.is_dir():
            print(f"{label} {folder} is not a folder; create it or give another.", file=sys.stderr)
            return 2

    try:
        import gradio  # noqa: F401  (only to say clearly that it is missing)
    except ImportError:
        print(
            'The standalone page needs gradio, which is not installed: pip install "ckpt2lora[ui]" '
            "(or, in a clone of the repository, pip install -r requirements-ui-gradio4.txt).",
            file=sys.stderr,
        )
        return 2
    from .standalone_services import StandaloneServices
    from .tab import build_tab

    services = StandaloneServices(args.models_dir, args.lora_dir, layer_delay=args.layer_delay)
    css_file = next((path for path in CSS_FILES if path.is_file()), None)
    css = css_file.read_text(encoding="utf8") if css_file else None
    blocks = build_tab(services, css=css, title="ckpt2lora")
    blocks.queue()
    blocks.launch(server_name=args.host, server_port=args.port, show_error=True, inbrowser=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
