"""Numbers and names used in more than one place."""

VERSION = "0.1.0"
TOOL_NAME = "ckpt2lora"
# The model families we recognise, as users name them (the --strict refusal, the generic
# warning, --help); architectures/ holds one module per family.
KNOWN_FAMILIES = "SD1.5, SDXL, Z-Image, Flux.1, Flux.2, Chroma, Qwen-Image, Lumina-Image-2.0, Wan 2.1/2.2 or Anima"
# Median ||delta|| / ||base|| above this means the variant is unlikely to be derived from
# the base (fine-tunes and merges stay far below; e.g. Z-Image Base vs Turbo mixes do not).
NOT_DERIVED_RELATIVE_DELTA = 0.3
# How many layers may be in memory at once, counting the one being computed (see prefetch.py).
PREFETCH_DEPTH = 2
