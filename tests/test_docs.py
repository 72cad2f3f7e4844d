"""The README stays a short front page, links in the docs resolve, commits are named only
in the results' provenance lines, and no text in the repository points at a document
outside it or at tracker issues by number."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# [text](target) and ![alt](target); the target ends at whitespace or ")"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ISSUE = re.compile(r"\bissue \d+", re.IGNORECASE)
# a markdown document named in prose or code, e.g. ``families.md``
MARKDOWN_NAME = re.compile(r"\b[\w\-]+\.md\b")
# markdown files the scripts write into their output directories (not in the repository)
WRITTEN_BY_SCRIPTS = {"summary.md", "OUT.md"}
SCANNED = ("docs", "pyro_bll", "models", "guides", "experiments")
# a commit hash: 7 to 40 hex digits with at least one letter and one digit
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
PROVENANCE = "*Provenance:*"


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _text_files() -> list[Path]:
    files = [README]
    for name in SCANNED:
        for path in sorted((ROOT / name).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append(path)
    return files


def test_readme_is_short_and_relative_links_resolve():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move detail into docs/"
    broken = []
    for md in _markdown_files():
        text = md.read_text(encoding="utf-8")
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # http:, https:, mailto: ...
            path = target.split("#", 1)[0]
            if not path:
                continue  # an anchor in the same file
            if not (md.parent / path).resolve().exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_no_outside_documents_or_issue_numbers():
    """Every markdown document the text names is one of the repository's own (or an output a
    script writes), and no text refers to a tracker issue by number."""
    own = {p.name for p in ROOT.rglob("*.md") if not {".git", "runs"} & set(p.parts)}
    found = []
    for path in [*_text_files(), *sorted((ROOT / "tests").rglob("*.py"))]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary files (images, archives) carry no prose
        for number, line in enumerate(text.splitlines(), 1):
            outside = set(MARKDOWN_NAME.findall(line)) - own - WRITTEN_BY_SCRIPTS
            if outside or ISSUE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "outside references or issue numbers:\n" + "\n".join(found)


def test_the_family_table_lists_exactly_the_registered_families():
    """docs/families.md's table is checked against the registry (a new family must be
    documented; a removed one must leave the table)."""
    from pyro_bll import FAMILIES

    text = (DOCS / "families.md").read_text()
    section = text.split("## The registered families", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)`", section, flags=re.M)
    assert sorted(rows) == sorted(FAMILIES), rows


def test_commits_only_in_the_provenance_lines_of_results():
    """The README and docs/ describe the code as it is: commit hashes (and the history they
    date) belong in CHANGELOG.md, except in docs/results.md's provenance lines."""
    found = []
    for md in _markdown_files():
        for number, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            if not COMMIT.search(line):
                continue
            if md.name == "results.md" and md.parent == DOCS and line.startswith(PROVENANCE):
                continue
            found.append(f"{md.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "commit hashes outside a provenance line:\n" + "\n".join(found)


def _tables_without_one_provenance_line(lines: list[str]) -> list[str]:
    """The first line of every table that is not preceded by exactly one provenance line
    since the table before it."""
    bad, provenance, in_table = [], 0, False
    for number, line in enumerate(lines, 1):
        if line.startswith("|") and not in_table:
            if provenance != 1:
                bad.append(f"line {number}: {provenance} provenance lines before {line[:60]}")
            provenance = 0
        in_table = line.startswith("|")
        provenance += line.startswith(PROVENANCE)
    return bad


def test_every_results_table_has_one_provenance_line():
    """Each table of docs/results.md is preceded by exactly one provenance line of its own
    (between it and the table before it)."""
    assert _tables_without_one_provenance_line(["| a |", "|---|"]) == [
        "line 1: 0 provenance lines before | a |"
    ]  # the check has teeth
    lines = (DOCS / "results.md").read_text(encoding="utf-8").splitlines()
    bad = _tables_without_one_provenance_line(lines)
    assert not bad, "docs/results.md tables without one provenance line:\n" + "\n".join(bad)


def test_every_api_page_path_imports():
    """docs/api.md names only import paths that import (``::: module.attr``)."""
    import importlib

    page = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    paths = re.findall(r"^::: ([\w.]+)", page, flags=re.M)
    assert len(paths) > 20
    for path in paths:
        module, _, attr = path.rpartition(".")
        try:
            importlib.import_module(path)
            continue
        except ImportError:
            pass
        assert hasattr(importlib.import_module(module), attr), path


def test_the_options_reference_is_generated_from_the_sections():
    """docs/options.md is what experiments/options_reference.py writes from the option
    sections (rerun it after changing an option), and the site's nav lists it."""
    from pyro_bll.run.parser import options_reference

    page = (DOCS / "options.md").read_text(encoding="utf-8")
    assert page == options_reference(), "run: python experiments/options_reference.py"
    assert "options.md" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
