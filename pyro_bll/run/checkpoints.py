"""Checkpoint files: atomic writes, weights-only loads, and the newest readable file.

Every checkpoint this project writes holds tensors and plain Python values only (numbers,
strings, lists, tuples, dicts, ``None``), so it loads with ``torch.load(...,
weights_only=True)``: the unpickler refuses any other object before constructing it, so
opening a checkpoint someone shared runs no code of theirs. RNG states are stored in that
form too (NumPy's state as a tensor, see ``rng_state``).

Names (0-based epochs)::

    checkpoints/epoch_NNN.pt               after epoch NNN
    checkpoints/epoch_NNN_step_SSSSSS.pt   inside epoch NNN, after SSSSSS of its steps
                                           (on a signal, or every --checkpoint-every steps)

``list_checkpoints`` orders them by (epoch, step) with a finished epoch after all of its
steps; ``newest_readable`` walks that list from the end and skips (never deletes) files
that cannot be read, naming each; ``--resume`` then moves each of them aside to
``<name>.unreadable`` (kept for inspection, out of the way of later resumes).
"""

from __future__ import annotations

import pickle
import random
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_bll.config import ConfigError

_NAME = re.compile(r"epoch_(\d+)(?:_step_(\d+))?\.pt$")
END_OF_EPOCH = 1 << 62  # sorts a finished epoch after every step inside it


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used: damaged, foreign, or not weights-only."""


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """``epoch_NNN.pt``, or ``epoch_NNN_step_SSSSSS.pt`` inside an epoch."""
    return f"epoch_{epoch:03d}" + ("" if step is None else f"_step_{step:06d}") + ".pt"


def checkpoint_path(out: Path, epoch: int, step: int | None = None) -> Path:
    """``out/checkpoints/`` + ``checkpoint_name``."""
    return Path(out) / "checkpoints" / checkpoint_name(epoch, step)


def checkpoint_key(path: Path) -> tuple[int, int] | None:
    """(epoch, step) of a checkpoint name; step ``END_OF_EPOCH`` for a finished epoch."""
    m = _NAME.fullmatch(Path(path).name)
    if m is None:
        return None
    return int(m.group(1)), END_OF_EPOCH if m.group(2) is None else int(m.group(2))


def list_checkpoints(directory: Path) -> list[Path]:
    """The checkpoint files of ``directory``, oldest first by (epoch, step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    keyed = ((checkpoint_key(p), p) for p in directory.glob("epoch_*.pt"))
    return [p for key, p in sorted((k, p) for k, p in keyed if k is not None)]


def prune_mid_epoch(newest: Path, keep: int = 0) -> None:
    """Delete the mid-epoch checkpoints beside ``newest`` that it supersedes (those named
    before it), except the ``keep`` most recent of them."""
    key = checkpoint_key(newest)
    older = [
        p
        for p in list_checkpoints(Path(newest).parent)
        if checkpoint_key(p)[1] != END_OF_EPOCH and checkpoint_key(p) < key
    ]
    for p in older[: max(len(older) - keep, 0)]:
        p.unlink(missing_ok=True)


# ---- RNG states as tensors and plain values ----------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA RNG states, in a weights-only loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ),  # fmt: skip
        "random": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``; RNG states go back as CPU byte tensors."""
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---- family links --------------------------------------------------------------------------
def family_links(families: Sequence[Any]) -> dict[str, int]:
    """``{family name: link_version}`` of a chain's families, as a checkpoint records it."""
    return {f.name: int(f.link_version) for f in families}


def check_links(state: dict[str, Any], families: Sequence[Any], path: Path) -> None:
    """Refuse a checkpoint whose families read raw block outputs another way than this code.

    A checkpoint records ``family_links`` under ``"family_links"``. One written before that
    record existed is accepted, with a warning on stderr for a family whose reading has
    changed since (``link_version > 1``), since its version cannot be told.
    """
    saved = state.get("family_links")
    for name, version in family_links(families).items():
        if saved is None:
            if version > 1:
                print(
                    f"warning: {path} does not record which {name} link it was trained "
                    f"with (written before checkpoints recorded it); if it predates link "
                    f"version {version} its block outputs mean another {name} here: "
                    "retrain it (docs/families.md)",
                    file=sys.stderr,
                )
        elif name in saved and int(saved[name]) != version:
            raise CheckpointError(
                f"{path} was trained with {name} link version {saved[name]}, this code reads "
                f"block outputs with version {version}, so its weights would mean another "
                f"{name}: retrain it (docs/families.md)"
            )


# ---- files -------------------------------------------------------------------------------
def save_atomic(obj: dict[str, Any], path: Path) -> Path:
    """``torch.save`` to a temporary name, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint weights-only; ``CheckpointError`` (one line) if it cannot be used.

    A file that holds any pickled object besides tensors and plain values is refused
    before that object is built; a truncated or damaged file is named as such.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))  # a class or function to build
        if refused:
            reason = f"global {refused.group(1)}"
            raise CheckpointError(
                f"{path} holds a pickled object that a weights-only load refuses ({reason}); "
                "it was not loaded: use checkpoints written by pyro_bll only"
            ) from None
        raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(e)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a pyro_bll checkpoint (no 'model' entry)")
    return state


@dataclass
class Found:
    """The newest readable checkpoint of a directory, and the newer ones that were not."""

    path: Path
    state: dict[str, Any]
    skipped: list[tuple[Path, str]]  # unreadable newer files, each with its one-line reason


def newest_readable(directory: Path, map_location: str | torch.device = "cpu") -> Found | None:
    """The newest checkpoint of ``directory`` that loads; None if there is none at all.

    Unreadable newer files are skipped and named in ``Found.skipped``, never deleted;
    if every file is unreadable, the newest one's ``CheckpointError`` is raised.
    """
    skipped: list[tuple[Path, str]] = []
    first_error: CheckpointError | None = None
    for path in reversed(list_checkpoints(directory)):
        try:
            return Found(path, load_checkpoint(path, map_location), skipped)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
