"""ArviZ diagnostics of forward/feedback agreement for trained runs (seeds = ArviZ chains).

    python experiments/diagnose.py runs/s2s_a runs/s2s_b runs/s2s_c

The same as ``pyro-bll diagnose ...``; what it writes, and where, is in
``pyro_bll.analysis.cli`` and docs/diagnostics.md; ``--help`` explains every option.
"""

from __future__ import annotations

import sys

from pyro_bll.analysis.cli import build_parser, cli, default_out, diagnose

__all__ = ["build_parser", "cli", "default_out", "diagnose"]

if __name__ == "__main__":
    sys.exit(cli())
