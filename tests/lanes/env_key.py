"""Print the cache key of a test environment: 16 hex digits of a hash over the Python
version and the text of its requirement files, following their -r / -c includes.

    python env_key.py REQUIREMENTS [REQUIREMENTS ...]

Run it with the environment's own interpreter, so a new Python patch release gets a new
environment. Standard library only (it runs before anything is installed).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def requirement_texts(path: Path, seen: set[Path]) -> list[str]:
    """The file's text (not its name: a rename keeps the environment), then the text of every file it includes, depth first."""
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    text = path.read_text(encoding="utf-8")
    texts = [text]
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 2 and parts[0] in ("-r", "-c", "--requirement", "--constraint"):
            texts += requirement_texts(path.parent / parts[1], seen)
    return texts


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    seen: set[Path] = set()
    digest = hashlib.sha256(sys.version.encode())
    for arg in argv:
        for text in requirement_texts(Path(arg), seen):
            digest.update(text.encode())
    print(digest.hexdigest()[:16])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
