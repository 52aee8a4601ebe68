"""The ckpt2lora tab (gradio), for the WebUI and as a standalone app.

``lib_ckpt2lora`` itself never imports this package; gradio is imported only here, by
``tab`` and the host adapters. Entry points:

- WebUI: ``scripts/ckpt2lora.py`` builds ``tab.build_tab(webui_services.WebUIServices())``;
- standalone: ``python -m lib_ckpt2lora.ui --models-dir DIR --lora-dir DIR``.
"""
