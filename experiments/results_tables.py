"""Write the generated results tables of the documentation from the JSON under results/.

    python experiments/results_tables.py           # rewrite the generated tables in docs/
    python experiments/results_tables.py --check   # exit 1 (and name them) if any is stale

A generated table sits in a page of docs/ between the lines ``<!-- tables:begin NAME -->``
and ``<!-- tables:end NAME -->``; everything between them is rewritten from ``TABLES[NAME]``,
so edit this file (or rerun the measurement), never the table. Each table starts with one
provenance line: the commit (or "commit not recorded"), the machine (the JSON's own
``machine`` field where it has one), the command and the data files. Only the standard
library is used, so the script runs without torch.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _flat_config(d: dict[str, Any]) -> dict[str, Any]:
    """A stored run configuration as one flat dict (``pyro_bll.config.flat_config``, without
    importing the package): ``config.json``'s sections merged, or an older flat one."""
    if isinstance(d.get("run"), dict):
        return {k: v for section in d.values() for k, v in section.items()}
    return dict(d)


ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = "*Provenance:*"
BEGIN = "<!-- tables:begin {} -->"
END = "<!-- tables:end {} -->"
MARKER = re.compile(r"<!-- tables:begin (\S+) -->\n.*?<!-- tables:end \1 -->", re.S)
CPU = "2-core x86_64 CPU (no GPU), torch 2.14.1"

Loaded = list[tuple[str, Any]]  # (path relative to results/, parsed JSON)


@dataclass(frozen=True)
class Table:
    """One generated table: where its numbers come from and how they were made."""

    name: str
    sources: tuple[str, ...]  # JSON files, relative to the results directory
    render: Callable[[Loaded, dict[str, str]], list[str]]
    command: str  # as recorded with the measurement (markdown)
    commit: str | None = None  # None: "commit not recorded"
    machine: str = CPU  # used when no source records its machine
    labels: dict[str, str] = field(default_factory=dict)  # renderer-specific row labels


# ---------------------------------------------------------------- formatting helpers


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not math.isnan(x)


def pct(x: float) -> str:
    return f"{100 * x:.2f}" if _finite(x) else "-"


def acc_cell(r: dict[str, Any]) -> str:
    """Accuracy of one result group: the value for one run, mean +- std for several."""
    if len(r.get("runs", [])) == 1:
        return pct(r["acc_mean"])
    return f"{pct(r['acc_mean'])} +- {pct(r['acc_std'])}"


def seconds(x: float) -> str:
    return f"{x:.1f}" if _finite(x) else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


METHOD = {"bll": "BLL", "bp": "BP", "fa": "FA", "predsim": "Pred-Sim"}
TASK = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
ARCH = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}


def _seeds(args: dict[str, Any]) -> str:
    return ", ".join(str(s) for s in args.get("seeds", []))


# ---------------------------------------------------------------- renderers


def render_s2s(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``reproduce_s2s.py``: one row per method and depth, mean +- std over the seeds."""
    (_, d), rows = data[0], []
    for key, r in d["results"].items():
        m = re.fullmatch(r"([a-z]+)_L(\d+)_N(\d+)", key)
        name = f"{METHOD.get(m[1], m[1])}, {m[2]} / {m[3]}" if m else key
        rows.append(
            [
                labels.get(key, name),
                f"{pct(r['acc_mean'])} +- {pct(r['acc_std'])}",
                f"{pct(r['seq_mean'])} +- {pct(r['seq_std'])}",
            ]
        )
    seeds = _seeds(d["args"])
    return table(
        [
            "method, layers / blocks",
            f"test token accuracy %, seeds {seeds}",
            "test sequence accuracy %",
        ],
        rows,
    )


def render_sweep(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``sweep_blocks.py``: accuracy per number of blocks (per method where recorded)."""
    (_, d) = data[0]
    by_method = d.get("by_method") or {"": d["results"]}
    header = ["blocks N"] + [
        f"{METHOD.get(m, m)} test accuracy %".strip() if m else "test token accuracy %"
        for m in by_method
    ]
    rows = [
        [str(n)] + [pct(by_method[m][i]["acc_mean"]) for m in by_method]
        for i, n in enumerate(d["blocks"])
    ]
    return table(header, rows)


BENCH_STEP_PARTS = ("blocks", "terms", "tracing", "backward", "optimiser")


def render_bench_step(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``bench_step.py``: median step times of BP, BLL through Pyro (blocks computed
    together, and one site per block where measured) and the plain-torch BLL per
    configuration, and the shares of the parts of the Pyro step."""
    rows = []
    for path, d in data:
        for r in d["rows"]:
            ms, share = r["median_ms"], r["shares"]
            rows.append(
                [
                    labels.get(
                        path,
                        f"{r['config']} (`--beta {r['beta']}`"
                        + (", `--compile`)" if r.get("compile") else ")"),
                    ),
                    f"{ms['bp']:.1f}",
                    f"{ms['pyro']:.1f}",
                    f"{ms['pyro_per_site']:.1f}" if "pyro_per_site" in ms else "-",
                    f"{ms['plain']:.1f}",
                    f"{r['ratio_bll_over_bp']:.2f}",
                    f"{r['ratio_pyro_over_plain']:.2f}",
                    " / ".join(f"{100 * share[k]:.0f}" for k in BENCH_STEP_PARTS),
                ]
            )
    return table(
        [
            "configuration",
            "BP ms",
            "Pyro BLL ms",
            "one site per block ms",
            "plain BLL ms",
            "BLL / BP",
            "Pyro / plain",
            "% of the Pyro step: " + " / ".join(BENCH_STEP_PARTS),
        ],
        rows,
    )


def render_families(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``bench_families.py``: one accuracy and one seconds-per-epoch column per task."""
    columns = [(task, res) for _, d in data for task, res in d["results"].items()]
    names: list[str] = []
    for _, res in columns:
        names += [n for n in res if n not in names]
    header = ["family"]
    for task, _ in columns:
        header += [f"{task} test accuracy %", "s / epoch"]
    rows = []
    for n in names:
        row = [labels.get(n, n)]
        for _, res in columns:
            r = res.get(n)
            row += [acc_cell(r), seconds(r["sec_per_epoch_mean"])] if r else ["not run", "-"]
        rows.append(row)
    return table(header, rows)


def render_estimators(data: Loaded, labels: dict[str, str]) -> list[str]:
    """Two ``bench_families.py`` runs, one per ``--likelihood`` (bound, then sample): the
    accuracy of each family with each estimator and their difference."""
    (_, bound), (_, sample) = data
    rows = []
    for task, res in bound["results"].items():
        other = sample["results"].get(task, {})
        for n, r in res.items():
            s = other.get(n)
            diff = "-" if s is None else f"{100 * (r['acc_mean'] - s['acc_mean']):+.2f}"
            rows.append([labels.get(n, n), pct(r["acc_mean"]),
                         "not run" if s is None else pct(s["acc_mean"]), diff])  # fmt: skip
    return table(["family", "bound, val acc %", "sample, val acc %", "bound - sample"], rows)


def render_estimator_runs(data: Loaded, labels: dict[str, str]) -> list[str]:
    """Single runs per family and ``--likelihood``: token and sequence accuracy."""
    rows = [[r["family"], r["likelihood"], pct(r["test_accuracy"]),
             pct(r["test_sequence_accuracy"])] for r in data[0][1]["rows"]]  # fmt: skip
    return table(["family", "`--likelihood`", "test token accuracy %",
                  "test sequence accuracy %"], rows)  # fmt: skip


def render_families_per_seed(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``bench_families.py`` over several seeds: one column per seed, then mean +- std."""
    (_, d) = data[0]
    seeds = d["args"]["seeds"]
    rows = []
    for res in d["results"].values():
        for n, r in res.items():
            by_seed = {run["seed"]: run["test_accuracy"] for run in r["runs"]}
            rows.append(
                [labels.get(n, n)]
                + [pct(by_seed.get(s, math.nan)) for s in seeds]
                + [f"{pct(r['acc_mean'])} +- {pct(r['acc_std'])}"]
            )
    header = ["family"] + [f"seed {s}" for s in seeds] + ["mean +- std"]
    return table(header, rows)


def render_table1(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``reproduce_table1.py``: one row per method and result file, the paper beside it."""
    rows, keys = [], {k.rsplit("/", 1)[0] for _, d in data for k in d["results"]}
    for path, d in data:
        for key, r in d["results"].items():
            setting, method = key.rsplit("/", 1)
            task, arch = setting.split("/")
            runs = r["runs"]
            done = {run.get("epochs_done") for run in runs}
            epochs = str(done.pop()) if len(done) == 1 else "-"
            planned = d.get("args", {}).get("epochs")
            if planned and epochs.isdigit() and int(epochs) < planned:
                epochs += f" of {planned}"
            if any(run.get("budget_exhausted") for run in runs):
                epochs += " (budget used up)"
            paper = d.get("paper", {}).get(setting, {}).get(method)
            name = METHOD.get(method, method)
            if len(keys) > 1:
                name = f"{TASK.get(task, task)} {ARCH.get(arch, arch)}, {name}"
            rows.append(
                [
                    name,
                    labels.get(path, f"`{path}`"),
                    acc_cell(r),
                    seconds(r["sec_per_epoch_mean"]),
                    epochs,
                    "-" if paper is None else f"{paper:g}",
                ]
            )
    return table(
        [
            "method",
            "run",
            "test accuracy %",
            "s / epoch",
            "epochs",
            "paper (full width, best of 5)",
        ],
        rows,
    )


def _run_name(c: dict[str, Any]) -> str:
    name = METHOD.get(c["method"], c["method"])
    threads = c.get("threads")
    each = " each" if c.get("distributed") else ""
    if c.get("distributed") and c.get("rank_blocks"):
        groups = " + ".join(str(b) for b in c["rank_blocks"])
        name += f", {len(c['rank_blocks'])} ranks ({groups} blocks, pipelined)"
    elif c.get("distributed"):
        name += ", distributed"
    else:
        name += ", one process"
    if threads:
        name += f", {threads} thread{'s' if threads > 1 else ''}{each}"
    return name


def render_runs(data: Loaded, labels: dict[str, str]) -> list[str]:
    """Run directories' ``metrics.json``: epochs, wall time and final test accuracy."""
    rows = []
    for path, d in data:
        c = _flat_config(d["config"])  # the sectioned format, or an older run's flat one
        done, planned = d["epochs_done"], c.get("epochs")
        epochs = (
            f"{done} of {planned} (budget used up)" if planned and done < planned else str(done)
        )
        rows.append(
            [
                labels.get(path, _run_name(c)),
                str(c.get("seed", "-")),
                epochs,
                f"{d['elapsed_seconds'] / 60:.1f}",
                seconds(d["seconds_per_epoch"]),
                pct(d["test_accuracy"]),
            ]
        )
    return table(
        ["run", "seed", "epochs", "minutes", "s / epoch (training)", "test accuracy %"], rows
    )


PIPELINE = {
    "bll_1_thread": "single-process BLL, 1 thread",
    "bll_2_threads": "single-process BLL, 2 threads",
    "bp_1_thread": "single-process BP, 1 thread",
    "bp_2_threads": "single-process BP, 2 threads",
}


def _variant(key: str) -> str:
    if key in PIPELINE:
        return PIPELINE[key]
    if m := re.fullmatch(r"(\d+)_ranks_(pipelined|sync)", key):
        how = "pipelined, 1 thread each" if m[2] == "pipelined" else "sync (no overlap)"
        return f"BLL, {m[1]} stages, {how}"
    if m := re.fullmatch(r"bll_(\d+)x(\d+)", key):
        return f"BLL, {m[1]} stage{'s' if int(m[1]) > 1 else ''} x {m[2]} replicas"
    if m := re.fullmatch(r"bp_ddp_(\d+)", key):
        return f"BP data parallel, {m[1]} processes"
    return key


def _ms(values: Sequence[float]) -> str:
    return " and ".join(f"{1000 * v:.1f}" for v in values) + " ms"


def render_pipeline(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``bench_pipeline.py``: samples per second of every variant, and the block times."""
    (_, d) = data[0]
    rows = []
    for key, sps in d["samples_per_second"].items():
        rows.append([_variant(key), f"{sps:.0f}", f"{d['speedup_over_bll_1_thread'][key]:.2f}"])
    return table(["variant", "samples / s", "x single-process BLL, 1 thread"], rows) + [
        "",
        f"Block times (each rank's work per step alone, 1 thread): "
        f"{_ms(d['block_seconds_per_step'])}; ideal speed-up 2 x mean / max = "
        f"{d['ideal_speedup']:.2f}; measured / ideal = {d['measured_over_ideal']:.2f}; "
        f"pipelined / single-process BLL with 2 threads = "
        f"{d['pipelined_over_bll_k_threads']:.2f}.",
    ]


def _network(c: dict[str, Any]) -> str:
    t = c["train_config"]
    if t["task"] == "s2s_reverse":
        return (
            f"s2s_reverse, {t['layers']} layers in {t['blocks']} blocks, "
            f"d_model {t['d_model']}, batch {t['batch_size']}"
        )
    return (
        f"{ARCH.get(t['arch'], t['arch'])}, width {t['width']:g}, {t['blocks']} blocks, "
        f"batch {t['batch_size']}"
    )


def render_pipeline_model(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``bench_pipeline.py`` with the cost model: measured against predicted throughput."""
    (_, d) = data[0]
    rows = []
    for key, predicted in d["predicted_samples_per_second"].items():
        measured = d["samples_per_second"][key]
        rows.append(
            [_variant(key), f"{measured:.0f}", f"{predicted:.0f}", f"{predicted / measured:.2f}"]
        )
    sps = d["samples_per_second"]
    notes = (
        f"Single process, 1 thread: BLL {sps['bll_1_thread']:.0f} / s, BP "
        f"{sps['bp_1_thread']:.0f} / s; contention factor "
        f"{d['model_inputs']['contention']:.2f}; stage times alone "
        f"{_ms(d['block_seconds_per_step'])}."
    )
    extrapolated = []
    for p, variants in d.get("model_extrapolation", {}).items():
        bp = variants.get(f"bp_ddp_{p}")
        bll = max((v for k, v in variants.items() if not k.startswith("bp_")), default=None)
        if bp and bll:
            extrapolated.append(f"{bll / bp:.2f}x for P = {p}")
    if extrapolated:
        notes += (
            " Model only (not measured), P workers like these on a network of P such "
            "blocks, best BLL layout against BP data parallel: " + ", ".join(extrapolated) + "."
        )
    return table([_network(d["config"]), "measured", "model", "model / measured"], rows) + [
        "",
        notes,
    ]


MEMORY_COLUMNS = {
    "bp": "BP",
    "bll_joint": "BLL joint",
    "bll_per_block": "BLL per-block, even split",
    "bll_per_block_memsplit": "BLL per-block, `--split memory`",
    "predsim": "Pred-Sim (per-block)",
}


def render_memory(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``bench_memory.py``: peak activation bytes (and their ratio to BP's), step times."""
    rows = []
    for _, d in data:
        for network, variants in d["results"].items():
            row = [network]
            for key in MEMORY_COLUMNS:
                v = variants.get(key)
                if v is None:
                    row.append("-")
                    continue
                mb = f"{v['activation_peak_bytes'] / 1e6:.0f} MB"
                row.append(mb if key == "bp" else f"{mb} ({v['activation_vs_bp']:.2f})")
            per_block = variants.get("bll_per_block", {})
            row += [
                f"{per_block['time_vs_bll_joint']:.2f}" if per_block else "-",
                f"{per_block['time_vs_bp']:.2f}" if per_block else "-",
            ]
            rows.append(row)
    header = ["network", *MEMORY_COLUMNS.values(), "step time per-block / joint", "per-block / BP"]
    return table(header, rows)


def render_estimator(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``bench_estimator.py``: signal-to-noise ratio of the local-likelihood gradient."""
    (_, d) = data[0]
    rows = [
        [labels.get(n, n), f"{s['joint']:.3f}", f"{s['per_label']:.3f}", f"{s['bound']:.1e}"]
        for n, s in d["snr"].items()
    ]
    return table(
        [
            "family",
            "one score-function term per sequence",
            "one per label (`--likelihood sample`)",
            "bound",
        ],
        rows,
    )


# ---------------------------------------------------------------- the tables

FROM_EXPERIMENTS = "command (from `experiments/`)"
FROM_ROOT = "command (from the repository root)"


def render_messages_exploration(data: Loaded, labels: dict[str, str]) -> list[str]:
    """Backward messages explored on one seed: validation accuracy per variant."""
    record = data[0][1]
    rows = [[r["variant"], f"`{r['options']}`" if r["options"] else "(defaults)",
             pct(r["val_accuracy"])] for r in record["rows"]]  # fmt: skip
    return table(["variant", "options", "val acc %"], rows)


def render_sweep_messages(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``sweep_messages.py``: mean +- std over seeds per method and number of blocks."""
    record = data[0][1]
    blocks = [str(k) for k in record["config"]["blocks"]]
    rows = []
    for method, cells in record["summary"].items():
        row = [labels.get(method, method)]
        for k in blocks:
            c = cells.get(k)
            row.append("-" if c is None else
                       f"{pct(c['mean'])} +- {pct(c['std'])} ({c['n']})")  # fmt: skip
        rows.append(row)
    return table(["method", *(f"K = {k}, val acc % (seeds)" for k in blocks)], rows)


def render_bench_messages(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``bench_messages.py``: step time, activation memory and bytes per refresh."""
    rows = [[r["variant"], f"{r['median_ms']:.1f}", f"{r['time_over_label']:.2f}",
             f"{r['activation_peak_bytes'] / 2**20:.1f}", f"{r['memory_over_label']:.2f}",
             f"{r['bytes_per_refresh']:,}", f"{r.get('bytes_held', 0):,}"]
            for r in data[0][1]["rows"]]  # fmt: skip
    header = ["variant", "ms per step", "x label", "activation peak (MB)", "x label",
              "bytes per refresh", "bytes held (targets)"]  # fmt: skip
    return table(header, rows)


def render_score_function(data: Loaded, labels: dict[str, str]) -> list[str]:
    """``bench_score_function.py``: bias in standard errors and variance per estimator."""
    rows = [[r["dependencies"], "yes" if r["baseline"] else "no", f"{r['max_bias_in_se']:.2f}",
             f"{r['variance']:.3f}", f"{r['ms_per_draw']:.2f}"]
            for r in data[0][1]["rows"]]  # fmt: skip
    header = ["dependencies", "baseline", "max abs(mean - exact) / SE", "summed variance",
              "ms per draw"]  # fmt: skip
    return table(header, rows)


TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        Table(
            "messages_exploration",
            ("messages_exploration.json",),
            render_messages_exploration,
            "`python experiments/run.py --task fashion_mnist --width 0.125 --blocks 8 "
            "--epochs 2 --train-size 20000 --val-size 10000 --seed 0 --threads 2 OPTIONS`",
            commit="739b074 to 1a35cdf",
        ),
        Table(
            "sweep_messages",
            ("sweep_messages.json",),
            render_sweep_messages,
            "`python experiments/sweep_messages.py --blocks 2 4 8 --seeds 0 1 2 --methods bp "
            "predsim local_ce label lookahead lookahead_2 --threads 1 --runs-dir runs/messages "
            "--results results` (the K = 4 and 8 runs of all but Pred-Sim with `--threads 2`, "
            "reused)",
            commit="739b074 to 1a35cdf for K = 4 and 8 but Pred-Sim, 8c06f67 to 97b5a86 for "
            "K = 2 and Pred-Sim",
            labels={
                "bp": "BP",
                "local_ce": "local cross-entropy alone",
                "label": "BLL, label feedback",
                "lookahead": "BLL, look-ahead to the top",
                "lookahead_2": "BLL, look-ahead L = 2",
                "predsim": "Pred-Sim",
                "target": "BLL, delayed targets (d = 1)",
            },  # fmt: skip
        ),
        Table(
            "sweep_messages_full",
            ("sweep_messages_full.json",),
            render_sweep_messages,
            "`python experiments/sweep_messages.py --blocks 8 4 --seeds 0 1 2 --methods "
            "lookahead local_ce bp --epochs 4 --train-size 50000 --val-size 10000 --threads 1 "
            "--runs-dir runs/messages_full --name sweep_messages_full`",
            labels={
                "bp": "BP",
                "local_ce": "local cross-entropy alone",
                "label": "BLL, label feedback",
                "lookahead": "BLL, look-ahead to the top (the default)",
                "lookahead_pred1": "BLL, look-ahead to the top, `--pred-weight 1`",
                "lookahead_pred0": "BLL, look-ahead to the top, `--pred-weight 0`",
            },  # fmt: skip
        ),
        Table(
            "messages_pred",
            ("messages_pred.json",),
            render_messages_exploration,
            "`python experiments/sweep_messages.py --blocks 8 --seeds 0 --methods "
            "lookahead_pred1 lookahead_pred0 lookahead_nokl --threads 1` (the protocol above)",
            commit="0773a60 to d864c25",
        ),
        Table(
            "messages_targets",
            ("messages_targets.json",),
            render_messages_exploration,
            "`python experiments/sweep_messages.py --blocks 8 --seeds 0 --methods target "
            "target_4 lookahead --threads 1` (the protocol above)",
            commit="6a30a11",
        ),
        Table(
            "messages_mlp",
            ("messages_mlp.json",),
            render_sweep_messages,
            "`python experiments/run.py --task fashion_mnist_mlp --layers K --blocks K "
            "--val-size 10000 --seed S --threads 1 OPTIONS` (the options of "
            "`experiments/sweep_messages.py`'s methods)",
            commit="8d4bcb7 to 5cb241b; seeds 1-2 at K = 6 and 12, and BP and local "
            "cross-entropy for seeds 1-2 at K = 3: 173d55f to a988758",
            labels={
                "bp": "BP",
                "local_ce": "local cross-entropy alone",
                "label": "BLL, label feedback",
                "lookahead": "BLL, look-ahead to the top",
            },  # fmt: skip
        ),
        Table(
            "bench_messages",
            ("bench_messages.json",),
            render_bench_messages,
            "`python experiments/bench_messages.py --blocks 8 --threads 2` (idle machine)",
            commit="298590c",
        ),
        Table(
            "bench_score_function",
            ("bench_score_function.json",),
            render_score_function,
            "`python experiments/bench_score_function.py --draws 2000`",
        ),
        Table(
            "s2s_reverse",
            ("s2s_reverse.json",),
            render_s2s,
            f"{FROM_EXPERIMENTS}: `python reproduce_s2s.py --seeds 0 1 2 --threads 2 "
            "--runs-dir ../runs/reproduce_s2s --results ../results`",
            machine=f"{CPU}, 2 threads",
        ),
        Table(
            "sweep_blocks",
            ("sweep_blocks.json",),
            render_sweep,
            f"{FROM_EXPERIMENTS}: `python sweep_blocks.py --blocks 1 2 4 5 10 20 --seeds 0 "
            "--runs-dir ../runs/sweep_blocks --results ../results`",
            machine=f"{CPU}, 2 threads",
        ),
        Table(
            "bench_step",
            ("bench_step.json", "bench_step_compile.json"),
            render_bench_step,
            "`python experiments/bench_step.py --threads 2 --repeats 40 "
            "--out results/bench_step` (idle machine); "
            "`python experiments/bench_step.py --configs s2s_5 --compile --threads 2 "
            "--warmup 3 --out results/bench_step_compile` (idle machine, with the compiled "
            "code already in torch's cache)",
            commit="1541874 for bench_step.json, 87f3bc2 for bench_step_compile.json",
        ),
        Table(
            "estimators_mlp",
            ("estimator_mlp_bound/families.json", "estimator_mlp_sample/families.json"),
            render_estimators,
            "`python experiments/bench_families.py --tasks fashion_mnist_mlp --seeds 0 --beta "
            "label --val-size 10000 --no-references --threads 1 --likelihood bound "
            "--runs-dir runs/estimator_mlp_bound --results results/estimator_mlp_bound`; the "
            "same with `sample`",
            commit="0773a60 to c8bc06c",
            machine=f"{CPU}, 1 thread per run beside other runs",
        ),
        Table(
            "estimators_s2s_len20",
            ("estimator_s2s_len20.json",),
            render_estimator_runs,
            "`python experiments/run.py --task s2s_reverse --seq-len 20 --family FAMILY "
            "--likelihood bound --threads 1 --out runs/estimator_s2s_len20/FAMILY_bound`; the "
            "same with `sample`",
            commit="c8bc06c to 80ab93e (gaussian_learned: 8034a3f)",
            machine=f"{CPU}, 1 thread per run beside other runs",
        ),
        Table(
            "families_bound",
            ("families_s2s/families.json", "families_mlp/families.json"),
            render_families,
            "commands (from the repository root): `python experiments/bench_families.py --seeds 0 "
            "--tasks s2s_reverse --threads 1 --runs-dir runs/bench_families_v2 "
            "--results results/families_s2s`; the same with `--tasks fashion_mnist_mlp` "
            "and `--results results/families_mlp`",
            commit="37c6130 to 7708411 for s2s_reverse (gaussian_learned rerun after 1c515da), "
            "9d48026 to 2fe8410 for the MLP",
            machine=f"{CPU}, 1 thread per run beside another run",
        ),
        Table(
            "families_s2s_3seeds",
            ("families_s2s_3seeds/families.json",),
            render_families_per_seed,
            f"{FROM_ROOT}: `python experiments/bench_families.py --seeds 0 1 2 --tasks s2s_reverse "
            "--threads 1 --no-references --runs-dir runs/bench_families_v2 "
            "--results results/families_s2s_3seeds`",
            commit="37c6130 to 3027be6",
            machine=f"{CPU}, 1 thread per run beside another run",
        ),
        Table(
            "families_s2s_l20_bd",
            ("families_s2s_l20_bd/families.json",),
            render_families,
            f"{FROM_ROOT}: `python experiments/bench_families.py --seeds 0 --tasks s2s_reverse "
            "--layers 20 --families beta dirichlet --no-references --threads 1 "
            "--runs-dir runs/bench_families_l20_bd --results results/families_s2s_l20_bd`",
            commit="2740bc6",
            machine=f"{CPU}, 1 thread per run beside another run",
        ),
        Table(
            "families_s2s_sample",
            ("families_s2s_sample/families.json",),
            render_families,
            f"{FROM_ROOT}: `python experiments/bench_families.py --seeds 0 --tasks s2s_reverse "
            "--threads 1 --likelihood sample --no-references --runs-dir runs/bench_families_sample "
            "--results results/families_s2s_sample`",
            machine=f"{CPU}, 1 thread per run beside another run",
        ),
        Table(
            "families_sampled",
            ("families.json",),
            render_families,
            f"{FROM_EXPERIMENTS}: `python bench_families.py --seeds 0 1 2 --threads 2 "
            "--runs-dir ../runs/bench_families --results ../results`",
            machine=f"{CPU}, 2 threads",
        ),
        Table(
            "table1",
            ("table1.json", "table1_v2/table1.json"),
            render_table1,
            "commands (from `experiments/`): `python reproduce_table1.py --tasks fashion_mnist "
            "--archs resnet18 --methods bp fa predsim bll --seeds 0 --width 0.125 --epochs 5 "
            "--max-minutes 14 --threads 2 --runs-dir ../runs/table1_cpu --results ../results`; "
            "the same with `--methods predsim bll --runs-dir ../runs/table1_cpu_v2 "
            "--results ../results/table1_v2`",
            machine=f"{CPU}, 2 threads, nothing else running",
            labels={"table1.json": "1", "table1_v2/table1.json": "2"},
        ),
        Table(
            "budget",
            tuple(
                f"table1_budget_v3/{r}/metrics.json"
                for r in (
                    "bp_lr4",
                    "bll_pw4_lr4_2ranks",
                    "bp_lr4_seed1",
                    "bll_pw4_lr4_2ranks_seed1",
                    "bll_pw4_lr4",
                    "fa_lr4",
                )
            ),
            render_runs,
            "commands (from the repository root): `python experiments/run.py --task fashion_mnist "
            "--method bp --width 0.125 --epochs 15 --max-minutes 15 --threads 2 --lr 0.004 "
            "--out runs/table1_budget_v3/bp_lr4`; "
            "`torchrun --standalone --nproc_per_node=2 experiments/run.py --task fashion_mnist "
            "--method bll --width 0.125 --epochs 20 --max-minutes 15 --threads 1 --distributed "
            "--rank-blocks 1,3 --lr 0.004 --pred-weight 4 "
            "--out runs/table1_budget_v3/bll_pw4_lr4_2ranks`; "
            "`python experiments/run.py --task fashion_mnist --method bll --width 0.125 "
            "--epochs 13 --max-minutes 15 --threads 2 --lr 0.004 --pred-weight 4 "
            "--out runs/table1_budget_v3/bll_pw4_lr4`; "
            "`python experiments/run.py --task fashion_mnist --method fa --width 0.125 "
            "--epochs 16 --max-minutes 15 --threads 2 --lr 0.004 "
            "--out runs/table1_budget_v3/fa_lr4`; the seed-1 runs add `--seed 1`",
            machine=f"{CPU}, nothing else running",
        ),
        Table(
            "budget_side_by_side",
            tuple(
                f"budget_side_by_side/{r}/metrics.json" for r in ("bp", "bll", "bp_10", "bll_15")
            ),
            render_runs,
            "commands (from the repository root), two at a time side by side with one thread "
            "each (`bp` beside `bll`, then `bp_10` beside `bll_15`): `python experiments/run.py "
            "--task fashion_mnist --method bp --width 0.125 --epochs 15 --max-minutes 15 "
            "--threads 1 --out runs/budget27/bp`; the same with `--method bll --epochs 10` "
            "(`bll`), `--method bp --epochs 10` (`bp_10`) and `--method bll --epochs 15` "
            "(`bll_15`, no budget)",
            commit="09a2700 (bp, bll), 0056b5b (bp_10, bll_15)",
            machine=f"{CPU}, two runs side by side",
            labels={
                "budget_side_by_side/bp/metrics.json": "BP, 15 epochs",
                "budget_side_by_side/bll/metrics.json": "BLL (look-ahead default), 10 epochs",
                "budget_side_by_side/bp_10/metrics.json": "BP, 10 epochs (no budget)",
                "budget_side_by_side/bll_15/metrics.json": "BLL, 15 epochs (no budget)",
            },
        ),
        Table(
            "budget_lr1e3",
            (
                "table1_budget_bp/table1.json",
                "table1_budget_bll_v2/table1.json",
                "table1_budget_bll/table1.json",
            ),
            render_table1,
            "`experiments/reproduce_table1.py` with the arguments stored under `args` in each file",
            machine=f"{CPU}, 2 threads, nothing else running",
            labels={
                "table1_budget_bp/table1.json": "Adam 1e-3",
                "table1_budget_bll_v2/table1.json": "Adam 1e-3, `--pred-weight 1`, "
                "`--message mean`",
                "table1_budget_bll/table1.json": "Adam 1e-3, `--pred-weight 1`, `--message pool`",
            },
        ),
        Table(
            "sweep_vision",
            ("sweep_blocks_fashion_mnist_resnet18.json",),
            render_sweep,
            f"{FROM_EXPERIMENTS}: `python sweep_blocks.py --task fashion_mnist --arch resnet18 "
            "--width 0.125 --blocks 1 2 4 8 --methods bll --epochs 2 --train-size 10000 "
            "--test-size 2000 --seeds 0 --threads 2 --runs-dir ../runs/sweep_vision "
            "--results ../results`",
            machine=f"{CPU}, 2 threads",
        ),
        Table(
            "bench_pipeline",
            ("bench_pipeline.json",),
            render_pipeline,
            f"{FROM_ROOT}: `flock /tmp/pyro_bll_cpu.lock python experiments/bench_pipeline.py`",
        ),
        Table(
            "bench_pipeline_replicas",
            ("bench_pipeline_replicas.json",),
            render_pipeline_model,
            f"{FROM_ROOT}: `python experiments/bench_pipeline.py "
            "--out results/bench_pipeline_replicas`",
            commit="dee9360",
        ),
        Table(
            "bench_pipeline_resnet18",
            ("bench_pipeline_resnet18.json",),
            render_pipeline_model,
            f"{FROM_ROOT}: `python experiments/bench_pipeline.py --task fashion_mnist "
            "--width 0.125 --batch-size 128 --steps 30 --out results/bench_pipeline_resnet18`",
            commit="dee9360",
        ),
        Table(
            "bench_memory",
            tuple(
                f"bench_memory_{n}/bench_memory.json"
                for n in ("resnet18", "resnet50", "transformer")
            ),
            render_memory,
            "commands (from the repository root): `python experiments/bench_memory.py "
            "--configs resnet18_grey28 resnet18_colour32 --repeats 3 --threads 1 "
            "--out results/bench_memory_resnet18`; the same with `--configs resnet50_grey28 "
            "resnet50_colour32 --repeats 1 --out results/bench_memory_resnet50` and with "
            "`--configs transformer20 --repeats 5 --out results/bench_memory_transformer`",
            commit="29fee18 (ResNets), 6fcc830 (transformer)",
        ),
        Table(
            "bench_estimator",
            ("bench_estimator.json",),
            render_estimator,
            f"{FROM_ROOT}: `python experiments/bench_estimator.py`",
            machine=f"{CPU}, 1 thread",
            labels={"gaussian": "gaussian (pathwise)"},
        ),
    ]
}


# ---------------------------------------------------------------- assembling


def load(results: Path, spec: Table) -> Loaded | None:
    """The table's JSON files, or None when any of them is missing."""
    paths = [results / s for s in spec.sources]
    if not all(p.is_file() for p in paths):
        return None
    return [(s, json.loads(p.read_text())) for s, p in zip(spec.sources, paths, strict=True)]


def provenance(spec: Table, data: Loaded) -> str:
    machines = list(
        dict.fromkeys(
            d["machine"]
            for _, d in data
            if isinstance(d, dict) and isinstance(d.get("machine"), str)
        )
    )
    if spec.commit:
        commit = f"commit{'s' if ' ' in spec.commit else ''} {spec.commit}"
    else:
        commit = "commit not recorded"
    machine = "; ".join(machines) if machines else spec.machine
    files = ", ".join(f"`results/{s}`" for s in spec.sources)
    return f"{PROVENANCE} {commit}; {machine}; {spec.command}; data: {files}."


def render(spec: Table, results: Path) -> str | None:
    """The markdown between the table's markers (without them); None without its data."""
    data = load(results, spec)
    if data is None:
        return None
    return "\n".join([provenance(spec, data), "", *spec.render(data, spec.labels)])


def render_all(results: Path, tables: dict[str, Table] | None = None) -> dict[str, str]:
    """Every table whose JSON files exist under ``results``, by name."""
    out = {}
    for name, spec in (TABLES if tables is None else tables).items():
        text = render(spec, results)
        if text is not None:
            out[name] = text
    return out


def block(name: str, text: str) -> str:
    return f"{BEGIN.format(name)}\n\n{text}\n\n{END.format(name)}"


def update_text(text: str, rendered: dict[str, str]) -> tuple[str, list[str]]:
    """Replace every marked table of ``text``; returns the new text and the names it holds.
    A marker whose table has no data is an error (the page would silently keep stale
    numbers)."""
    found: list[str] = []

    def replace(m: re.Match[str]) -> str:
        name = m[1]
        if name not in rendered:
            raise KeyError(f"no table named {name!r}, or its JSON files are missing")
        found.append(name)
        return block(name, rendered[name])

    return MARKER.sub(replace, text), found


def update_docs(docs: Path, results: Path, *, check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, compare) the marked tables of every page in ``docs``;
    returns the pages that were (or would be) changed."""
    rendered = render_all(results)
    pages, placed = {}, []
    for page in sorted(docs.glob("*.md")):
        old = page.read_text(encoding="utf-8")
        new, found = update_text(old, rendered)
        placed += found
        if new != old:
            pages[page] = new
    unplaced = sorted(set(rendered) - set(placed))
    if unplaced:
        raise KeyError(f"tables without a place in {docs}: {', '.join(unplaced)}")
    if not check:
        for page, new in pages.items():
            page.write_text(new, encoding="utf-8")
    return [str(page) for page in pages]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--results", type=Path, default=ROOT / "results", help="the JSON files")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="the pages to update")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = p.parse_args(argv)
    try:
        changed = update_docs(args.docs, args.results, check=args.check)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    for page in changed:
        print(f"{'stale' if args.check else 'updated'}: {page}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
