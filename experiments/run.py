"""Train a network with block-local learning (BLL) or backprop (BP) and write the results.

    python experiments/run.py --task s2s_reverse
    python experiments/run.py --task s2s_reverse --method bp --layers 20 --out runs/bp20

The same as ``pyro-bll run ...``; ``--help`` explains every option.
"""

from __future__ import annotations

import sys

from pyro_bll.cli import run_cli as cli
from pyro_bll.run.parser import build_parser, parse_config, resume_command

__all__ = ["build_parser", "cli", "parse_config", "resume_command"]

if __name__ == "__main__":
    sys.exit(cli())
