"""One-step smoke tests of every experiment script on tiny settings."""

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name, *args, cwd, rc=0):
    """Run ``experiments/NAME`` with ``args`` as ``python NAME`` would, in this process
    (the interpreter and torch are loaded already: seconds saved per script); assert its
    exit code is ``rc``. Returns its captured ``stdout`` and ``stderr``."""
    out, err = io.StringIO(), io.StringIO()
    argv, path, here, threads = sys.argv, list(sys.path), os.getcwd(), torch.get_num_threads()
    sys.argv = [str(ROOT / "experiments" / name), *map(str, args)]
    sys.path.insert(0, str(ROOT / "experiments"))
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv, sys.path[:] = argv, path
        os.chdir(here)
        torch.set_num_threads(threads)  # a script sets its own --threads
    assert code == rc, err.getvalue()[-2000:]
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def _tiny(tmp_path, runs):
    """One epoch on 50 examples, one thread, runs and results under ``tmp_path``."""
    return ["--epochs", 1, "--train-size", 50, "--threads", 1,
            "--runs-dir", tmp_path / runs, "--results", tmp_path / "res"]  # fmt: skip


def test_sweep_reproduce_and_plot_scripts(tmp_path):
    _script("sweep_blocks.py", "--layers", 2, "--blocks", 1, 2, *_tiny(tmp_path, "sweep"),
            cwd=tmp_path)  # fmt: skip
    sweep = json.loads((tmp_path / "res" / "sweep_blocks.json").read_text())
    assert sweep["blocks"] == [1, 2] and len(sweep["results"]) == 2
    assert (tmp_path / "res" / "sweep_blocks.png").stat().st_size > 1000

    _script("reproduce_s2s.py", "--layers", 2, "--seeds", 0, 1, *_tiny(tmp_path, "rep"),
            cwd=tmp_path)  # fmt: skip
    table = (tmp_path / "res" / "s2s_reverse.md").read_text()
    assert "bll_L2_N2" in table and "bp_L2_N2" in table

    run_dirs = sorted(str(p) for p in (tmp_path / "rep").iterdir())
    _script("plot_runs.py", *run_dirs, "--out", tmp_path / "overlay.png", cwd=tmp_path)
    assert (tmp_path / "overlay.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_rejects_blocks_that_do_not_divide_layers(tmp_path):
    proc = _script("sweep_blocks.py", "--layers", 4, "--blocks", 3, cwd=tmp_path, rc=2)
    assert "divide --layers 4" in proc.stderr


def test_bench_step_reports_ratios_and_parts(tmp_path, monkeypatch):
    from vision_files import tiny_fashion_mnist

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    import bench_step

    data = tiny_fashion_mnist(tmp_path / "fm", n_train=256, n_test=128)
    argv = ["--configs", "resnet_k4", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--data-dir", str(data), "--out", str(tmp_path / "b")]  # fmt: skip
    assert bench_step.main(argv) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["resnet_k4"]
    for r in rows:
        assert r["ratio_pyro_over_plain"] > 0 and r["ratio_bll_over_bp"] > 0
        assert set(r["shares"]) == {"blocks", "terms", "tracing", "backward", "optimiser"}
        assert r["parts_ms"]["blocks"] > 0 and r["parts_ms"]["backward"] > 0
    assert rows[0]["beta"] == "lookahead"  # the task's default message
    table = (tmp_path / "b").with_suffix(".md").read_text()
    assert "| resnet_k4 (`--beta lookahead`) |" in table
    assert bench_step.main(["--repeats", "0"]) == 2


def test_bench_families_smoke_and_restart_reuses_finished_runs(tmp_path):
    args = ["--families", "gaussian", "bernoulli", "--tasks", "s2s_reverse", "--seeds", 0,
            *_tiny(tmp_path, "runs")]  # fmt: skip
    _script("bench_families.py", *args, cwd=tmp_path)
    table = (tmp_path / "res" / "families.md").read_text()
    rows = ["| gaussian |", "| bernoulli |", "| gaussian + feedback solve (kl, pred) |", "| BP on"]
    for row in rows:
        assert row in table
    ckpt = tmp_path / "runs" / "s2s_reverse_gaussian_seed0" / "checkpoints" / "epoch_000.pt"
    before = ckpt.stat().st_mtime_ns
    _script("bench_families.py", *args, cwd=tmp_path)
    assert ckpt.stat().st_mtime_ns == before  # read back, not retrained


def test_reproduce_table1_and_vision_sweep_smoke_and_restart(tmp_path):
    from vision_files import tiny_fashion_mnist

    data = tiny_fashion_mnist(tmp_path / "fashion", n_train=50)
    vision = ["--width", 0.05, "--test-size", 8, "--batch-size", 25]
    args = ["--methods", "bp", "bll", "--seeds", 0, 1, "--fashion-dir", data, *vision,
            *_tiny(tmp_path, "t1")]  # fmt: skip
    _script("reproduce_table1.py", *args, cwd=tmp_path)
    table = (tmp_path / "res" / "table1.md").read_text()
    assert "| task | BP | BLL |" in table and "| Fashion-MNIST, ResNet-18 |" in table
    assert "(paper 94.2)" in table and "(paper 92.7)" in table
    result = json.loads((tmp_path / "res" / "table1.json").read_text())["results"]
    assert set(result) == {"fashion_mnist/resnet18/bp", "fashion_mnist/resnet18/bll"}
    assert [r["seed"] for r in result["fashion_mnist/resnet18/bll"]["runs"]] == [0, 1]
    assert (tmp_path / "res" / "table1_curves.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = tmp_path / "t1" / "fashion_mnist_resnet18_w0.05_bll_seed1" / "checkpoints"
    before = (ckpt / "epoch_000.pt").stat().st_mtime_ns
    _script("reproduce_table1.py", *args, cwd=tmp_path)
    assert (ckpt / "epoch_000.pt").stat().st_mtime_ns == before  # read back, not retrained

    _script("sweep_blocks.py", "--task", "fashion_mnist", "--arch", "resnet18", "--blocks", 1, 8,
            "--data-dir", data, *vision, *_tiny(tmp_path, "sweep"), cwd=tmp_path)  # fmt: skip
    sweep = json.loads((tmp_path / "res" / "sweep_blocks_fashion_mnist_resnet18.json").read_text())
    assert sweep["blocks"] == [1, 8] and len(sweep["by_method"]["bll"]) == 2


def test_bench_score_function_smoke(tmp_path):
    _script("bench_score_function.py", "--draws", 3, "--out", tmp_path / "sf", cwd=tmp_path)
    rows = json.loads((tmp_path / "sf.json").read_text())["rows"]
    assert {(r["dependencies"], r["baseline"]) for r in rows} == {
        ("graph", True), ("graph", False), ("block", True), ("block", False)
    }  # fmt: skip
    assert all(r["variance"] >= 0 for r in rows)
    _script("bench_score_function.py", "--draws", 1, cwd=tmp_path, rc=2)


def test_sweep_messages_smoke_and_restart(tmp_path):
    from vision_files import tiny_fashion_mnist

    data = tiny_fashion_mnist(tmp_path / "fashion", n_train=24)
    args = ["--blocks", 2, "--seeds", 0, "--methods", "local_ce", "critic",
            "--epochs", 1, "--train-size", 8, "--val-size", 8, "--width", 0.05, "--threads", 1,
            "--data-dir", data, "--runs-dir", tmp_path / "runs",
            "--results", tmp_path / "res"]  # fmt: skip
    _script("sweep_messages.py", *args, cwd=tmp_path)
    record = json.loads((tmp_path / "res" / "sweep_messages.json").read_text())
    assert {r["method"] for r in record["runs"]} == {"local_ce", "critic"}
    assert "| critic |" in (tmp_path / "res" / "sweep_messages.md").read_text()
    assert (tmp_path / "res" / "sweep_messages.png").read_bytes()[:4] == b"\x89PNG"
    again = _script("sweep_messages.py", *args, cwd=tmp_path)  # finished runs are reused
    assert "run.py" not in again.stdout
    _script("sweep_messages.py", "--blocks", 1, cwd=tmp_path, rc=2)
