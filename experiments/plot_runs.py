"""Overlay the learning curves of several runs (e.g. BLL vs BP, paper Fig. 3B).

python experiments/plot_runs.py runs/bll runs/bp --out curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyro_bll.config import flat_config
from pyro_bll.run.plots import plot_runs


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="run directories written by run.py")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    args = p.parse_args()
    curves = {}
    for run in args.runs:
        path = Path(run) / "metrics.json"
        if not path.exists():
            print(f"error: {path} does not exist; pass run directories of run.py", file=sys.stderr)
            return 2
        m = json.loads(path.read_text())
        cfg = flat_config(m["config"])  # the sectioned format, or an older run's flat one
        curves[f"{cfg['method'].upper()} {cfg['blocks'] or cfg.get('layers')} blocks ({run})"] = m[
            "history"
        ]
    plot_runs(curves, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
