"""Assemble the per-rank checkpoints of a distributed run into one single-process checkpoint.

    python experiments/assemble_checkpoint.py runs/s2s_dist            # last complete epoch
    python experiments/assemble_checkpoint.py runs/s2s_dist --epoch 2  # epoch 2 (1-based)

Reads ``RUN/rank_<R>/epoch_<NNN>.pt`` of every rank (copy them into one directory first
if the ranks ran on several nodes) and writes ``RUN/checkpoints/epoch_<NNN>.pt`` in the
format ``pyro_bll.run.training`` writes: ``run.py --resume --out RUN`` continues it in one
process and the diagnostics load it like any other checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from pyro_bll.config import ConfigError
from pyro_bll.distributed import assemble, complete_epochs


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", help="the --out directory of a run.py --distributed job")
    p.add_argument(
        "--epoch",
        type=int,
        default=None,
        help="epoch to assemble, 1-based (default: the last one every rank has written)",
    )
    args = p.parse_args(argv)
    try:
        if args.epoch is not None and args.epoch < 1:
            raise ConfigError(f"--epoch must be >= 1, got {args.epoch}")
        path = assemble(args.run_dir, None if args.epoch is None else args.epoch - 1)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = ", ".join(str(e + 1) for e in complete_epochs(args.run_dir))
    print(f"wrote {path} (complete epochs: {done})")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
