"""experiments/results_tables.py: the generated results tables carry the JSON's numbers and
one provenance line each, and the tables committed in docs/ are the script's output on
the stored results/ (so the documentation cannot drift from the data)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import results_tables as rt  # noqa: E402


def _group(accs, seq=None, seconds=10.0):
    """One result group as ``common.run_seeds`` writes it: runs, mean and std."""
    n = len(accs)
    mean = sum(accs) / n
    std = (sum((a - mean) ** 2 for a in accs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    runs = [{"seed": s, "test_accuracy": a, "seconds_per_epoch": seconds}
            for s, a in enumerate(accs)]  # fmt: skip
    seq = accs if seq is None else seq
    return {"runs": runs, "acc_mean": mean, "acc_std": std, "seq_mean": sum(seq) / n,
            "seq_std": 0.0, "sec_per_epoch_mean": seconds}  # fmt: skip


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _provenance_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(rt.PROVENANCE)]


def test_sequence_reversal_table_from_a_tiny_json(tmp_path):
    _write(tmp_path / "s2s_reverse.json", {
        "args": {"seeds": [0, 1], "layers": [2]},
        "results": {"bll_L2_N2": _group([0.975, 0.95], seq=[0.9, 0.8]),
                    "bp_L2_N2": _group([0.5, 0.5])},
    })  # fmt: skip
    tables = rt.render_all(tmp_path)
    assert list(tables) == ["s2s_reverse"]  # the other tables have no data here
    text = tables["s2s_reverse"]
    lines = text.splitlines()
    assert len(_provenance_lines(text)) == 1 and lines[0].startswith(rt.PROVENANCE)
    assert "commit not recorded" in lines[0] and "`results/s2s_reverse.json`" in lines[0]
    assert "reproduce_s2s.py" in lines[0]
    assert "| BLL, 2 / 2 | 96.25 +- 1.77 | 85.00 +- 0.00 |" in lines
    assert "| BP, 2 / 2 | 50.00 +- 0.00 | 50.00 +- 0.00 |" in lines
    assert "seeds 0, 1" in lines[2]  # the header names the seeds of the JSON


def test_families_table_single_seed_values_and_missing_rows(tmp_path):
    _write(tmp_path / "fam.json", {
        "args": {"seeds": [0]},
        "results": {"s2s_reverse": {"gaussian": _group([1.0], seconds=11.74),
                                    "gamma": _group([0.9861])},
                    "fashion_mnist_mlp": {"gaussian": _group([0.8186], seconds=27.6)}},
    })  # fmt: skip
    spec = rt.Table("fam", ("fam.json",), rt.render_families, "`python x.py`",
                    commit="abc1234", machine="a test machine")  # fmt: skip
    text = rt.render(spec, tmp_path)
    assert _provenance_lines(text) == [
        "*Provenance:* commit abc1234; a test machine; `python x.py`; data: `results/fam.json`."
    ]
    rows = text.splitlines()[2:]
    assert rows[0].startswith("| family | s2s_reverse test accuracy % | s / epoch |")
    # one seed: the value alone; a family that a task did not run says so
    assert "| gaussian | 100.00 | 11.7 | 81.86 | 27.6 |" in rows
    assert "| gamma | 98.61 | 10.0 | not run | - |" in rows


def test_the_json_machine_field_wins_and_several_commits_read_as_commits(tmp_path):
    row = {"config": "s2s_5", "beta": "label",
           "median_ms": {"pyro": 2.0, "plain": 1.6, "bp": 1.0},
           "ratio_pyro_over_plain": 1.25, "ratio_bll_over_bp": 2.0,
           "shares": {"blocks": 0.2, "terms": 0.3, "tracing": 0.1, "backward": 0.35,
                      "optimiser": 0.05}}  # fmt: skip
    _write(tmp_path / "b.json", {"rows": [row], "machine": "x86_64, 2 threads, torch X"})
    spec = rt.Table("b", ("b.json",), rt.render_bench_step, "`cmd`",
                    commit="1111aaa (first), 2222bbb (second)")  # fmt: skip
    text = rt.render(spec, tmp_path)
    (line,) = _provenance_lines(text)
    assert line.startswith("*Provenance:* commits 1111aaa (first), 2222bbb (second); x86_64, 2")
    # a row measured before the per-site variant existed shows "-" in its column
    assert (
        "| s2s_5 (`--beta label`) | 1.0 | 2.0 | - | 1.6 | 2.00 | 1.25 | 20 / 30 / 10 / 35 / 5 |"
        in text
    )


def test_markers_are_rewritten_and_missing_data_is_an_error(tmp_path):
    docs, results = tmp_path / "docs", tmp_path / "results"
    _write(results / "sweep_blocks.json", {"args": {"seeds": [0]}, "blocks": [1, 4],
                                           "results": [_group([1.0]), _group([0.75])]})  # fmt: skip
    docs.mkdir()
    page = docs / "results.md"
    stale = (
        "# R\n\n<!-- tables:begin sweep_blocks -->\nold numbers\n<!-- tables:end sweep_blocks -->\n"
    )
    page.write_text(stale)
    assert rt.update_docs(docs, results, check=True) == [str(page)]
    assert page.read_text() == stale  # --check writes nothing
    assert rt.main(["--docs", str(docs), "--results", str(results), "--check"]) == 1
    assert rt.main(["--docs", str(docs), "--results", str(results)]) == 0
    text = page.read_text()
    assert "old numbers" not in text and "| 4 | 75.00 |" in text
    assert len(_provenance_lines(text)) == 1
    assert rt.update_docs(docs, results, check=True) == []  # now up to date

    page.write_text(text + "\n<!-- tables:begin table1 -->\n<!-- tables:end table1 -->\n")
    with pytest.raises(KeyError, match="table1"):  # a marker whose JSON is missing
        rt.update_docs(docs, results)
    page.write_text("# R\n")
    with pytest.raises(KeyError, match="without a place"):  # data whose table has no marker
        rt.update_docs(docs, results)


def test_every_table_has_its_data_and_one_provenance_line():
    tables = rt.render_all(ROOT / "results")
    assert sorted(tables) == sorted(rt.TABLES), "a table's JSON file is missing from results/"
    for name, text in tables.items():
        assert len(_provenance_lines(text)) == 1, name
        assert text.startswith(rt.PROVENANCE), name


def test_the_committed_docs_are_the_scripts_output():
    stale = rt.update_docs(ROOT / "docs", ROOT / "results", check=True)
    assert not stale, (
        f"{stale} differ from the JSON under results/: run python experiments/results_tables.py"
    )
