"""`heads compare`: pairs with known answers, the published files, and shape errors."""

import json

import pytest
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.errors import AttnkitError
from attnkit.heads import scores as S
from attnkit.heads.compare import compare_scores


def _file(values, layers=4, heads=4):
    return {(l, h): [values[l * heads + h]] for l in range(layers) for h in range(heads)}


VALUES = [0.9, 0.1, 0.0, 0.3, 0.05, 0.7, 0.2, 0.0, 0.4, 0.0, 0.15, 0.6, 0.0, 0.25, 0.35, 0.5]


def test_a_file_against_itself_and_an_affine_copy():
    a = _file(VALUES)
    same = compare_scores(a, a, top=5)
    assert same["overlap"] == 5 and same["pearson"] == 1.0 and same["spearman"] == 1.0 and not same["only_a"]
    scaled = compare_scores(a, _file([2 * v + 1 for v in VALUES]), top=5)
    assert scaled["overlap"] == 5 and scaled["pearson"] == 1.0 and scaled["spearman"] == 1.0


def test_reversed_and_swapped_scores():
    a = _file(VALUES)
    rev = compare_scores(a, _file([1 - v for v in VALUES]), top=3)
    assert rev["pearson"] == -1.0 and rev["spearman"] == -1.0 and rev["overlap"] == 0
    swapped = list(VALUES)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # the best head (0-0) trades places with a weak one (0-1)
    res = compare_scores(a, _file(swapped), top=3)  # top-3 of a: 0-0, 0-5 (1-1), 2-3; of b: 0-1, 1-1, 2-3
    assert res["overlap"] == 2 and res["only_a"] == [[0, 0]] and res["only_b"] == [[0, 1]]
    assert -1 < res["spearman"] < 1


def test_shapes_must_match_and_published_files_compare(shared_data, tmp_path):
    root = shared_data / "retrieval_head" / "head_score"
    llama, mistral, qwen = (S.load_scores(root / f) for f in
                            ("llama-2-7b-80k.json", "Mistral-7B-v0.2-hf.json", "Qwen1.5-14B-Chat.json"))
    with pytest.raises(AttnkitError, match="different shapes"):
        compare_scores(llama, qwen)
    assert compare_scores(llama, llama, 20)["overlap"] == 20
    across = compare_scores(llama, mistral, 20)  # two unrelated model families: the heads are not shared
    assert across["overlap"] <= 4 and abs(across["pearson"]) < 0.5
    r = CliRunner().invoke(app, ["heads", "compare", str(root / "llama-2-7b-80k.json"), str(root / "Mistral-7B-v0.2-hf.json"),
                                 "--top", "10", "--plot", str(tmp_path / "c.png"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["top"] == 10 and (tmp_path / "c.png").stat().st_size > 10_000
