"""Code blocks of the README and the docs pages (docs/) that run on the embedded model, or on a real
model the test run installed, are executed, so the documents cannot rot."""

import re
from pathlib import Path

import pytest

from attnkit.heads import scores as S

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


REAL = '"smollm2-135m-instruct"'


def runnable_blocks() -> list[str]:
    """Blocks on the embedded model, and on a real model that the test run has installed."""
    blocks = [b for doc in DOCS for b in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)]
    return [b for b in blocks if ('"embedded"' in b or REAL in b) and "/models/" not in b and ".gguf" not in b]


def test_there_are_runnable_blocks():
    assert any("head_kv" in b for b in runnable_blocks()) and any(REAL in b for b in runnable_blocks())


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.splitlines()[-1][:40])
def test_readme_block_runs(block, tmp_path, monkeypatch, capsys, request):
    if REAL in block:
        request.getfixturevalue("smollm2")  # skips (or fails on CI) where it is not installed
    monkeypatch.chdir(tmp_path)
    # the blocks read a score file as `attnkit heads detect` writes it: retrieval heads in layers 5-6
    S.save_scores({(l, h): [0.9 if l in (5, 6) and h < 4 else 0.0] for l in range(8) for h in range(8)},
                  tmp_path / "head_scores.json")
    exec(compile(block, "docs", "exec"), {})
    assert capsys.readouterr().out.strip()
