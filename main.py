"""Train a Titans model from a YAML config: the seed's entry point, now `titans train` underneath.

    python main.py                                        # trains this repository's config.yaml
    python main.py --config config.yaml                   # the seed's usage
    python main.py --config my.yaml training.max_epochs=5 model.variant=MAG
    python main.py --resume                               # continue the config's run from its newest checkpoint

Other commands (eval, compare, generate, memory-check, bench) are on `python -m titans`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from titans.cli import main

# Without --config the repository's config.yaml is trained, as in the seed (all defaults if it is missing).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"

if __name__ == "__main__":
    config = DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None
    sys.exit(main(["train", *sys.argv[1:]], default_config=config, may_reexec=True))
