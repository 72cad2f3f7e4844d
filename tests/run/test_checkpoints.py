"""Checkpoint files: weights-only loads, damaged files, fallback on --resume, RNG states."""

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pyro_bll.analysis.diagnostics import load_run
from pyro_bll.distributed.rank_checkpoints import assemble
from pyro_bll.run.checkpoints import (
    CheckpointError,
    check_links,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import run  # noqa: E402

TINY = ["--layers", "2", "--d-model", "16", "--seq-len", "4", "--train-size", "64",
        "--test-size", "16", "--batch-size", "16", "--threads", "1", "--no-progress"]  # fmt: skip


class _MakesMarker:
    """Unpickling this object would call ``open(marker, "w")``: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted(path: Path, marker: Path) -> Path:
    torch.save({"model": {}, "epoch": 9, "payload": _MakesMarker(marker)}, path)
    assert not marker.exists()
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch tiny run (epoch_000.pt, epoch_001.pt), copied by tests that damage it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert run.cli([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_every_checkpoint_the_trainer_writes_loads_weights_only(trained):
    for path in list_checkpoints(trained / "checkpoints"):
        state = torch.load(path, weights_only=True)  # raises on any other pickled object
        assert set(state) >= {"model", "optimizer", "rng", "history", "config"}


def test_a_pickled_object_is_refused_by_name_and_never_built(tmp_path):
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / "epoch_000.pt", marker)
    with pytest.raises(CheckpointError, match=r"weights-only load refuses \(global io.open\)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_diagnostics_refuse_a_crafted_checkpoint_without_running_it(trained, tmp_path):
    out = _copy(trained, tmp_path / "run")
    marker = tmp_path / "marker"
    _crafted(out / "checkpoints" / "epoch_009.pt", marker)
    with pytest.raises(CheckpointError, match="epoch_009.pt holds a pickled object"):
        load_run(out)
    assert not marker.exists()


def test_assembly_refuses_a_crafted_rank_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "rank_0").mkdir()
    _crafted(tmp_path / "rank_0" / "epoch_000.pt", marker)
    with pytest.raises(CheckpointError, match="rank_0/epoch_000.pt holds a pickled object"):
        assemble(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage", [_truncate, lambda p: p.write_bytes(b""), lambda p: p.write_bytes(b"not a zip")]
)
def test_a_damaged_file_is_named_in_one_line(tmp_path, damage):
    path = save_atomic({"model": {"w": torch.ones(3)}}, tmp_path / "epoch_000.pt")
    damage(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "corrupt or truncated" in message


def test_resume_falls_back_to_the_newest_readable_checkpoint(trained, tmp_path, capsys):
    """The truncated last epoch is moved aside (kept) and training repeats it exactly."""
    out = _copy(trained, tmp_path / "run")
    _truncate(out / "checkpoints" / "epoch_001.pt")
    capsys.readouterr()
    assert run.cli([*TINY, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "epoch_001.pt is corrupt or truncated" in err and "resuming from epoch_000.pt" in err
    kept = out / "checkpoints" / "epoch_001.pt.unreadable"
    assert kept.exists() and kept.stat().st_size > 0  # the bad file is never deleted
    full = tmp_path / "full"
    assert run.cli([*TINY, "--epochs", "3", "--out", str(full)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())["history"]
    straight = json.loads((full / "metrics.json").read_text())["history"]
    assert [h["block_losses"] for h in resumed] == [h["block_losses"] for h in straight]
    assert [h["test_accuracy"] for h in resumed] == [h["test_accuracy"] for h in straight]


def test_resume_with_no_readable_checkpoint_exits_2_naming_the_file(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "run")
    for path in list_checkpoints(out / "checkpoints"):
        _truncate(path)
    capsys.readouterr()
    assert run.cli([*TINY, "--epochs", "3", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "epoch_001.pt is corrupt or truncated" in err
    assert (out / "checkpoints" / "epoch_001.pt").exists()  # nothing moved or deleted


def test_checkpoints_record_the_family_link_they_were_trained_with(trained):
    for path in list_checkpoints(trained / "checkpoints"):
        assert torch.load(path, weights_only=True)["family_links"] == {"gaussian": 1}


def _with_gaussian_link_7(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained run whose last checkpoint records gaussian link version 7."""
    out = _copy(trained, tmp_path / "run")
    path = out / "checkpoints" / "epoch_001.pt"
    state = torch.load(path, weights_only=True)
    state["family_links"] = {"gaussian": 7}
    torch.save(state, path)
    return out, path


def test_resume_refuses_a_checkpoint_of_another_link_version_and_keeps_it(
    trained, tmp_path, capsys
):
    out, path = _with_gaussian_link_7(trained, tmp_path)
    before = path.read_bytes()
    capsys.readouterr()
    assert run.cli([*TINY, "--epochs", "3", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gaussian link version 7" in err and "retrain" in err
    assert path.read_bytes() == before  # refused, not moved aside or rewritten


def test_diagnostics_refuse_a_checkpoint_of_another_link_version(trained, tmp_path):
    out, _ = _with_gaussian_link_7(trained, tmp_path)
    with pytest.raises(
        CheckpointError, match="epoch_001.pt was trained with gaussian link version 7"
    ):
        load_run(out)


def test_a_checkpoint_without_a_link_record_is_accepted_with_a_warning_where_it_matters(
    tmp_path, capsys
):
    """Version 1 families load old checkpoints silently; a family whose reading changed
    (version 2) loads them with a one-line warning, since the version cannot be told."""
    path = tmp_path / "epoch_000.pt"
    check_links({}, [SimpleNamespace(name="bernoulli", link_version=1)], path)
    assert capsys.readouterr().err == ""
    check_links({}, [SimpleNamespace(name="gamma", link_version=2)], path)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gamma" in err and "retrain" in err
    check_links(
        {"family_links": {"gamma": 2}}, [SimpleNamespace(name="gamma", link_version=2)], path
    )
    assert capsys.readouterr().err == ""
    with pytest.raises(CheckpointError, match="gamma link version 1"):
        check_links(
            {"family_links": {"gamma": 1}}, [SimpleNamespace(name="gamma", link_version=2)], path
        )


def test_the_gamma_records_its_changed_link():
    from pyro_bll.families import FAMILIES

    versions = {name: cls.link_version for name, cls in FAMILIES.items()}
    assert versions == {**dict.fromkeys(FAMILIES, 1), "gamma": 2}


def test_names_sort_mid_epoch_checkpoints_between_epochs(tmp_path):
    names = [checkpoint_path(tmp_path, 1), checkpoint_path(tmp_path, 1, 7),
             checkpoint_path(tmp_path, 0), checkpoint_path(tmp_path, 1, 12)]  # fmt: skip
    (tmp_path / "checkpoints").mkdir()
    for p in names:
        p.write_bytes(b"")
    order = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert order == ["epoch_000.pt", "epoch_001_step_000007.pt", "epoch_001_step_000012.pt",
                     "epoch_001.pt"]  # fmt: skip


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    path = save_atomic({"model": {}, "rng": rng_state()}, tmp_path / "epoch_000.pt")
    expected = (random.random(), np.random.standard_normal(4), torch.rand(4))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), np.random.standard_normal(4), torch.rand(4))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


# config.json of the tiny run above as the flat format before the option sections wrote it:
# all 49 options, unset ones as null, the vision, Pred-Sim and distributed ones included
OLD_FLAT_CONFIG = {
    "task": "s2s_reverse", "method": "bll", "family": "gaussian", "family_args": {},
    "layers": 2, "blocks": None, "d_model": 16, "seq_len": 4, "epochs": 2,
    "train_size": 64, "test_size": 16, "val_size": None, "data_dir": None,
    "batch_size": 16, "lr": 0.002, "lr_schedule": "constant", "pred_weight": 1.0,
    "clip_grad": 0.0, "pred_head": "linear", "bll_terms": ["kl", "likelihood", "pred"],
    "feedback": "linear", "feedback_update": "grad", "ridge": 1.0, "propagate": "mean",
    "likelihood": None, "arch": "resnet18", "split": "even", "width": 1.0,
    "message": "pool", "sim_weight": 0.99, "seed": 0, "out": "runs/s2s_reverse",
    "device": "cpu", "channels_last": False, "amp": False, "max_minutes": None,
    "backward": "joint", "checkpoint_every": None, "augment": True, "threads": 1,
    "resume": False, "overwrite": False, "distributed": False, "replicas": None,
    "schedule": "pipelined", "rank_blocks": None, "dist_backend": "auto",
    "dist_timeout": 300.0, "pipeline_depth": 2,
}  # fmt: skip


def test_a_run_saved_in_the_old_flat_format_resumes_and_is_diagnosed(trained, tmp_path):
    """config.json and the checkpoints' "config" in the flat format of older runs: the
    configuration loads (the options of sections that do not apply dropped, nulls
    resolved), equals the command line's, and the run resumes and is diagnosed."""
    from pyro_bll.run.options import RunConfig

    out = _copy(trained, tmp_path / "old")
    flat = {**OLD_FLAT_CONFIG, "out": str(out)}
    (out / "config.json").write_text(json.dumps(flat, indent=2))
    for path in (out / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        state["config"] = flat
        torch.save(state, path)
    # an old run's unset --likelihood was the bound, every family's default then
    cfg, _ = run.parse_config([*TINY, "--epochs", "2", "--likelihood", "bound", "--out", str(out)])
    loaded = RunConfig.from_dict(flat)
    assert loaded == cfg and loaded.bll.likelihood == "bound" and loaded.vision is None
    assert RunConfig.from_dict(loaded.to_dict()) == loaded  # the new format round-trips
    assert load_run(out).epoch == 2  # the diagnostics read config.json and the checkpoint
    assert run.cli([*TINY, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert set(json.loads((out / "config.json").read_text())) == {
        "run", "training", "network", "data", "stack", "sequence", "bll"
    }  # fmt: skip
