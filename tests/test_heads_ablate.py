import pytest

from attnkit.errors import AttnkitError
from attnkit.evals import niah as N
from attnkit.heads import ablate as A
from conftest import result_lines


def test_random_heads_avoid_retrieval_heads():
    scores = {(l, h): [0.5 if (l, h) in {(0, 1), (2, 3)} else 0.0] for l in range(3) for h in range(4)}
    assert A.excluded_heads(scores) == {(0, 1), (2, 3)}  # fewer than 100 score above 0
    for seed in range(20):
        drawn = A.random_heads(3, 4, 5, A.excluded_heads(scores), seed)
        assert len(set(drawn)) == 5 and not set(drawn) & {(0, 1), (2, 3)}
    assert A.random_heads(3, 4, 5, set(), 1) == A.random_heads(3, 4, 5, set(), 1)
    many = {(l, h): [1.0 / (1 + l * 20 + h)] for l in range(10) for h in range(20)}
    assert len(A.excluded_heads(many)) == 100
    with pytest.raises(AttnkitError, match="cannot draw"):
        A.random_heads(3, 4, 11, A.excluded_heads(scores), 0)


def test_ablation_runs_three_conditions_and_masking_changes_answers(tmp_path, embedded):
    model, tok = embedded
    scores = {(l, h): [float(l == 5 and h < 4)] for l in range(8) for h in range(8)}
    needles = N.load_needles()[:1]
    out = tmp_path / "a.jsonl"
    res = A.ablate(model, tok, scores, 4, N.Grid(needles, N.load_haystack(), [256], [0, 100]), mode="zero",
                   phase="both", seeds=2, out=out, quiet=True)
    assert res["top_heads"] == [(5, 0), (5, 1), (5, 2), (5, 3)]
    assert all(not set(h) & set(res["top_heads"]) for h in res["random_heads"].values())
    assert set(res["grids"]) == {"none", "top", "random_seed0", "random_seed1"}
    assert len(result_lines(out)) == 4 * 2
    rows = [__import__("json").loads(l) for l in result_lines(out)]
    none = [r["answer"] for r in rows if r["condition"] == "none"]
    top = [r["answer"] for r in rows if r["condition"] == "top"]
    assert none != top  # zeroing 4 heads of layer 5 in both phases changes the output
    bad = {(9, 0): [1.0]}
    with pytest.raises(AttnkitError, match="does not exist"):
        A.ablate(model, tok, bad, 1, N.Grid(needles, N.load_haystack(), [256], [0]), quiet=True)
