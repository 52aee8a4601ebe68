"""Copy a generated pair keeping only its first N numbered blocks (and every other tensor).

make_pairs.py gives each tensor its own seed, so the copy is exactly the pair that
``make_pairs.py ARCH --blocks N`` writes, made by reading instead of generating (seconds, not
minutes): generate the largest block count once, take the smaller ones from it.

    python benchmarks/take_blocks.py /pairs/wan_b8 4 /pairs/wan_b4   # *_base/_variant.safetensors
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stio import PlainReader, StreamingSafetensorsWriter  # noqa: E402

BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.")


def take(source: Path, blocks: int, target: Path) -> None:
    with PlainReader(source) as reader:
        names = [name for name in reader.infos if (m := BLOCK.search(name)) is None or int(m.group(1)) < blocks]
        layout = [(name, reader.infos[name].shape, reader.infos[name].dtype) for name in names]
        writer = StreamingSafetensorsWriter(target, layout, reader.metadata)
        try:
            for name in names:
                writer.write(name, reader.get(name))
        except BaseException:
            writer.abort()
            raise
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="the pair's stem: STEM_base.safetensors and STEM_variant.safetensors")
    ap.add_argument("blocks", type=int)
    ap.add_argument("target", help="the new pair's stem")
    args = ap.parse_args()
    for side in ("base", "variant"):
        take(Path(f"{args.source}_{side}.safetensors"), args.blocks, Path(f"{args.target}_{side}.safetensors"))
        print(f"{args.target}_{side}.safetensors")


if __name__ == "__main__":
    main()
