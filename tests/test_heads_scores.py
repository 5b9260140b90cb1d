import json
import statistics

import pytest
import torch

from attnkit.errors import AttnkitError
from attnkit.heads import scores as S


@pytest.mark.parametrize("name", ["llama-2-7b-80k", "Mistral-7B-v0.2-hf", "Qwen1.5-14B-Chat"])
def test_published_score_files_load_rank_and_summarise(shared_data, name):
    path = shared_data / "retrieval_head/head_score" / f"{name}.json"
    raw = json.loads(path.read_text())
    data = S.load_scores(path)
    assert len(data) == len(raw)
    means = {k: statistics.fmean(v) for k, v in raw.items()}
    best = max(means, key=means.get)
    rank = S.ranked(data)
    assert f"{rank[0][0]}-{rank[0][1]}" == best
    assert all(a[2] >= b[2] for a, b in zip(rank, rank[1:]))
    result = S.summary(data, top=10)
    assert result["above_threshold"] == sum(m > 0.1 for m in means.values())
    assert 0 < result["fraction_above"] < 0.05  # the paper: retrieval heads are < 5% of heads
    grid = S.as_grid(data)
    layer, head = map(int, best.split("-"))
    assert grid.max() == grid[layer, head]


def test_roundtrip_and_bad_file(tmp_path):
    data = {(0, 0): [0.5, 0.0], (0, 1): [0.2], (1, 0): [0.0], (1, 1): [1.0, 0.5]}
    S.save_scores(data, tmp_path / "s.json")
    assert (tmp_path / "s.json").read_text().count("\n") == 0
    assert S.load_scores(tmp_path / "s.json") == data
    assert torch.allclose(S.as_grid(data), torch.tensor([[0.25, 0.2], [0.0, 0.75]]))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(AttnkitError, match="not a retrieval-score file"):
        S.load_scores(tmp_path / "bad.json")


def test_scores_by_layer_type_on_a_hybrid_model(tmp_path):
    """Gemma-style models: where the retrieval heads sit, full vs sliding layers, from the score file."""
    from attnkit.core.family import architecture
    from conftest import run_cli, tiny_config

    arch = architecture(tiny_config("gemma3"))  # layers: full, sliding, full; 4 heads each
    scores = {(l, h): [0.9 if (l, h) in {(0, 1), (2, 3), (1, 0)} else 0.0] for l in range(3) for h in range(4)}
    assert S.by_layer_type(scores, arch) == {"full": {"heads": 8, "above_threshold": 2},
                                             "sliding": {"heads": 4, "above_threshold": 1}}
    tiny_config("gemma3").save_pretrained(tmp_path / "m")
    S.save_scores(scores, tmp_path / "s.json")
    r = run_cli("heads", "show", str(tmp_path / "s.json"), "--model", str(tmp_path / "m"), "--json")
    res = json.loads(r.stdout)
    assert res["by_layer_type"]["sliding"]["above_threshold"] == 1 and set(res["top_layer_types"][:3]) == {"full", "sliding"}
