"""Every generated block of README.md and the docs pages equals what scripts/render_docs.py makes of
the committed result files; a block whose file is missing, or a figure edited by hand, fails. Every
relative link of those pages points at a file that exists."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages():
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", [d for d in _pages() if "<!-- begin: " in (ROOT / d).read_text()])
def test_generated_blocks_match_their_result_files(render, doc):
    text = (ROOT / doc).read_text()
    new, problems = render.render(text, doc)
    assert not problems, problems
    assert new == text, f"{doc}: run `python scripts/render_docs.py` (a block differs from results/)"


def test_every_relative_link_of_the_docs_finds_its_file():
    import re

    broken = []
    for doc in _pages():
        text = re.sub(r"```.*?```", "", (ROOT / doc).read_text(), flags=re.S)
        for target in re.findall(r"\]\((?!https?:|mailto:|#)([^)\s]+)\)", text):
            path = (ROOT / doc).parent / target.partition("#")[0]
            if not path.exists():
                broken.append(f"{doc}: {target}")
    assert broken == []


def test_an_edited_figure_and_a_missing_file_are_caught(render, tmp_path, monkeypatch):
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    block = render.BLOCK.search(text)
    body = block.group("body")
    digit = next(i for i, ch in enumerate(body) if ch.isdigit() and i > body.find("|"))
    edited = text.replace(body, body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:], 1)
    assert render.render(edited)[0] != edited  # re-rendering undoes the edit: the check would fail
    monkeypatch.setattr(render, "RESULTS", tmp_path)  # no result files at all
    new, problems = render.render(text, "docs/benchmarks.md")
    assert problems and all("missing" in p for p in problems)
    unknown = render.render("<!-- begin: no-such-block -->\n<!-- end: no-such-block -->\n", "x.md")[1]
    assert unknown == ["x.md: unknown block 'no-such-block'"]


def test_every_table_of_the_study_uses_the_shared_verdict_words(render):
    from attnkit.reproduce import verdicts as V

    text = (ROOT / "docs" / "results" / "study.md").read_text()
    table = render.BLOCK.search(text[text.index("<!-- begin: study-table"):]).group("body")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    words = (V.HOLDS, V.FAILS, V.TOO_FEW, V.NOT_MEASURABLE, "not run")
    assert rows and all(any(w in row for w in words) for row in rows)


def test_each_committed_study_report_is_its_step_files_rendered(tmp_path):
    import shutil

    from attnkit.reproduce.report import build_report
    from attnkit.reproduce.study import STEPS

    # a study still running (its trials committed so that it resumes) has no report yet
    folders = sorted(p for p in (ROOT / "results" / "study").iterdir() if (p / "report.md").is_file())
    assert folders
    for folder in folders:
        copy = tmp_path / folder.name
        copy.mkdir()
        for step in STEPS:
            if (folder / f"{step}.json").is_file():
                shutil.copy(folder / f"{step}.json", copy)
        assert build_report(copy).read_text() == (folder / "report.md").read_text(), folder.name
