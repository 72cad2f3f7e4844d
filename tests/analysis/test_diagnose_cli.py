"""run.py --diagnostics, experiments/diagnose.py on two seeds, its plots and its bad input."""

import json
import shutil
import sys
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import diagnose  # noqa: E402
import run  # noqa: E402

from pyro_bll import make_family  # noqa: E402
from pyro_bll.analysis import diagnostic_plots as plots  # noqa: E402
from pyro_bll.analysis.diagnostics import BLOCK_SCALARS, collect, to_inference_data  # noqa: E402
from pyro_bll.core.agreement import LOGGED  # noqa: E402

from utils import assert_close, mlp_chain, toy_batch  # noqa: E402

TINY = ["--layers", "2", "--d-model", "8", "--seq-len", "4", "--train-size", "64",
        "--test-size", "16", "--batch-size", "16", "--threads", "1", "--no-progress"]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Two 2-epoch runs of the tiny transformer (seeds 0, 1); the first with --diagnostics."""
    root = tmp_path_factory.mktemp("runs")
    dirs = [root / f"seed{s}" for s in (0, 1)]
    for s, d in enumerate(dirs):
        extra = ["--diagnostics"] if s == 0 else []
        assert run.cli([*TINY, "--epochs", "2", "--seed", str(s), "--out", str(d), *extra]) == 0
    return dirs


def test_training_logs_agreement_and_run_writes_netcdf(two_seeds):
    history = json.loads((two_seeds[0] / "metrics.json").read_text())["history"]
    for h in history:
        agreement = h["block_agreement"]
        assert set(agreement) == set(LOGGED) and all(len(v) == 2 for v in agreement.values())
        assert all(0 <= a <= 1 for a in agreement["local_acc"])
        assert all(-1 <= c <= 1 for c in agreement["mean_cos"][:-1] + agreement["proto_cos"][:-1])
        # the last block has no latent (the head reads m(alpha_N)): its statistics are null
        assert [agreement[n][-1] for n in ("mean_cos", "proto_cos", "feedback_weight")] == [
            None, None, None
        ]  # fmt: skip
    idata = az.from_netcdf(str(two_seeds[0] / "diagnostics.nc"))
    assert idata.agreement.sizes == {"chain": 1, "draw": 100, "block": 2, "channel": 8,
                                     "class": 5}  # fmt: skip
    assert json.loads(idata.posterior.attrs["epochs"]) == [2]
    assert not (two_seeds[1] / "diagnostics.nc").exists()


def test_diagnose_two_seeds_writes_tables_plots_and_netcdf(two_seeds, tmp_path, capsys):
    out = tmp_path / "diag"
    argv = [*map(str, two_seeds), "--out", str(out), "--batch", "8", "--draws", "12"]
    assert diagnose.cli(argv) == 0
    assert "2 run(s), 2 blocks, batch 8" in capsys.readouterr().out
    for name in ("densities", "forest_kl", "agreement_by_block", "agreement_epochs",
                 "runs_side_by_side", "training_agreement"):  # fmt: skip
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 5000, name
    idata = az.from_netcdf(str(out / "diagnostics.nc"))
    assert idata.agreement.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 12
    assert json.loads(idata.agreement.attrs["runs"]) == ["seed0", "seed1"]
    summary = (out / "summary.csv").read_text()
    assert "r_hat" in summary and "ess_bulk" in summary and "local_acc_class[1, 3]" in summary
    # the last block (1) has no latent: only its head's accuracy is summarised
    assert "kl[0]" in summary and "kl[1]" not in summary and "local_acc[1]" in summary
    table = (out / "summary.md").read_text().splitlines()
    assert table[2].startswith("| block | kl |") and len(table) == 2 + 2 + 2
    # the last block has no latent: no draws (NaN) in either group
    for group in (idata.posterior, idata.prior):
        z = group.z.values  # [chain, draw, block, example, position, channel]
        assert np.isnan(z[:, :, 1]).all() and np.isfinite(z[:, :, 0]).all()
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves) == {"seed0", "seed1"} and set(curves["seed0"]) == {"1", "2"}
    assert set(curves["seed0"]["2"]) == set(BLOCK_SCALARS)
    # block 1 of 2 has no latent (the head reads m(alpha_N)): only the head's accuracy
    last = table[-1].split(" | ")
    cells = dict(zip(BLOCK_SCALARS, last[1:-2], strict=True))
    assert [c == "n/a" for c in cells.values()] == [n != "local_acc" for n in cells], table[-1]
    assert curves["seed0"]["2"]["feedback_weight"][1] is None
    assert 0 <= curves["seed0"]["2"]["local_acc"][1] <= 1
    # the within-class variation of the backward messages (pyro_bll/core/message_variation.py)
    for name in ("message_within", "feedback_within"):
        v = idata.agreement[name]
        assert v.dims == ("chain", "draw", "block") and v.shape == (2, 12, 2), name
        assert np.isnan(v.values[:, :, 1]).all() and f"{name}[0]" in summary, name
        assert f"{name}[1]" not in summary and curves["seed0"]["2"][name][1] is None, name
    message = idata.agreement["message_within"].values[:, :, 0]
    assert ((message > 0) & (message <= 1)).all()  # the prototype gradient reads m(alpha_0)
    assert np.abs(idata.agreement["feedback_within"].values[:, :, 0]).max() < 1e-6  # float32


def test_diagnose_writes_beside_the_run_by_default(two_seeds, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not into the current directory
    assert diagnose.cli([str(two_seeds[1]), "--batch", "4", "--draws", "3", "--last-only"]) == 0
    assert (two_seeds[1] / "diagnostics" / "diagnostics.nc").exists()
    assert not (tmp_path / "diagnostics").exists()
    assert diagnose.default_out([str(two_seeds[0]), str(two_seeds[1])]) == (
        two_seeds[0].resolve().parent / "diagnostics"
    )


def test_plots_render_for_a_discrete_family(tmp_path):
    chain = mlp_chain(make_family("categorical", group_size=3), register_params=False).eval()
    x, y = toy_batch()
    idata = to_inference_data([collect(chain, x, y, None, draws=10)], y, None)
    plots.plot_densities(idata, tmp_path / "d.png")
    plots.plot_kl_forest(idata, tmp_path / "f.png")
    plots.plot_runs(idata, ["only"], tmp_path / "r.png")
    for name in ("d", "f", "r"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG)
    assert not plots.plot_training({"old": [{"epoch": 1}]}, tmp_path / "t.png")


def test_the_kl_forest_marks_each_latent_blocks_r_hat_on_its_row(monkeypatch, tmp_path):
    """Two runs of a 3-block MLP (blocks 0-1 have a latent): one R-hat marker per block,
    at the height of that block's row and at ArviZ's R-hat for it; none for the last."""
    chain = mlp_chain(make_family("gaussian"), register_params=False).eval()
    x, y = toy_batch()
    runs = [collect(chain, x, y, None, draws=20, seed=s) for s in (0, 1)]
    idata = to_inference_data(runs, y, None)
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_kl_forest(idata, tmp_path / "f.png")
    forest, panel = figures[0].axes[:2]
    rows = {t.get_text().rsplit("[", 1)[1]: y for t, y in
            zip(forest.get_yticklabels(), forest.get_yticks(), strict=True)}  # fmt: skip
    assert sorted(rows) == ["0]", "1]"]  # the last block (2) has no latent: no row
    rhat = az.rhat(idata.agreement[["kl"]])["kl"]
    marks = sorted((line.get_ydata()[0], line.get_xdata()[0]) for line in panel.lines)
    expected = sorted((rows[f"{b}]"], float(rhat.sel(block=b))) for b in (0, 1))
    assert_close(marks, expected, atol=1e-12)


def _bad(tmp_path, two_seeds):
    """Run directories that diagnose.py must refuse, with the words its error names."""
    empty = tmp_path / "empty"
    empty.mkdir()
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(two_seeds[0], no_ckpt)
    shutil.rmtree(no_ckpt / "checkpoints")
    other = tmp_path / "other_width"  # a checkpoint of a wider network in a narrow run
    assert run.cli([*TINY, "--d-model", "12", "--epochs", "1", "--out", str(other)]) == 0
    foreign = tmp_path / "foreign"
    shutil.copytree(two_seeds[0], foreign)
    shutil.copy(other / "checkpoints" / "epoch_000.pt", foreign / "checkpoints" / "epoch_009.pt")
    hacked = tmp_path / "hacked"  # right config entry, wrong weights
    shutil.copytree(two_seeds[0], hacked)
    state = torch.load(other / "checkpoints" / "epoch_000.pt", weights_only=False)
    state["config"] = json.loads((hacked / "config.json").read_text())
    torch.save(state, hacked / "checkpoints" / "epoch_009.pt")
    return [
        ([empty], "has no config.json"),
        ([no_ckpt], "has no checkpoints/epoch_*.pt"),
        ([foreign], "incompatible configuration (d_model 12"),
        ([hacked], "the weights do not fit the network"),
        ([two_seeds[0], other], "incompatible configuration"),
        ([two_seeds[0], "--batch", "0"], "--batch must be positive"),
        ([two_seeds[0], "--draws", "0"], "--draws must be positive"),
    ]


def test_bad_input_is_one_line_with_exit_code_2(two_seeds, tmp_path, capsys):
    for argv, needle in _bad(tmp_path, two_seeds):
        code = diagnose.cli([*map(str, argv), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and "\n" not in err, (argv, err)


@pytest.mark.parametrize(
    "task, method",
    [("s2s_reverse", "bp"), ("s2s_reverse", "fa"), ("fashion_mnist", "predsim")],
)
def test_every_method_is_rebuilt_and_agreement_is_refused_where_meaningless(
    tmp_path, capsys, task, method
):
    """BP, FA and Pred-Sim train no feedback network: run.py --diagnostics writes the
    forward draws only (their modules are rebuilt before the weights load), and
    diagnose.py refuses the agreement statistics with one line."""
    if task == "s2s_reverse":
        args = [*TINY, "--epochs", "1"]
    else:
        from vision_files import tiny_fashion_mnist

        data = tiny_fashion_mnist(tmp_path / "data")
        args = ["--task", task, "--data-dir", str(data), "--width", "0.05", "--train-size",
                "8", "--test-size", "8", "--batch-size", "4", "--epochs", "1", "--threads",
                "1", "--no-progress"]  # fmt: skip
    out = tmp_path / method
    assert run.cli([*args, "--method", method, "--diagnostics", "--out", str(out)]) == 0
    assert "forward draws z ~ alpha only" in capsys.readouterr().out
    idata = az.from_netcdf(str(out / "diagnostics.nc"))
    assert set(idata.groups()) == {"prior", "observed_data", "constant_data"}
    assert "trains no feedback network" in idata.prior.attrs["omitted"]
    assert diagnose.cli([str(out), "--out", str(tmp_path / "diag")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--method {method} trains no feedback network" in err
