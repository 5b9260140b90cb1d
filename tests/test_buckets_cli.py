import json

import numpy as np

from attnkit.buckets import search_bases, waveform
from test_cli import attnkit
from conftest import result_lines


def test_search_bases_json_equals_the_library():
    r = attnkit("buckets", "search-bases", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bases"] == search_bases().bases
    r = attnkit("buckets", "search-bases", "--method", "paper", "--n", "3", "--json")
    assert json.loads(r.stdout)["bases"] == search_bases(method="paper", n=3).bases


def test_waveform_json_and_plot(tmp_path):
    r = attnkit("buckets", "waveform", "--bases", "10000,20000", "--head-dim", "64", "--range", "0:2048",
                "--plot", str(tmp_path / "w.png"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    waves = waveform([10000, 20000], 64, np.arange(0, 2048))
    assert [b["argmin"] for b in out["bases"]] == waves.argmin(1).tolist()
    assert out["envelope_min"] == round(float(waves.max(0).min()), 4)
    assert (tmp_path / "w.png").stat().st_size > 10_000


def test_generate_with_embedded_and_bad_input(tmp_path):
    r = attnkit("buckets", "generate", "--prompt", "The lucky number of Ashford is", "--bases", "10000,16000",
                "--max-new-tokens", "5", "--json", "--plot-weights", str(tmp_path / "wt.png"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["weights"]) == 5 and all(abs(sum(w) - 1) < 1e-4 for w in out["weights"])
    assert (tmp_path / "wt.png").exists()
    for args in (["buckets", "generate", "--prompt", "x"], ["buckets", "generate", "--prompt", "x", "--bases", "0"],
                 ["buckets", "generate", "--prompt", "x", "--bases", "1e4", "--combine", "vote"],
                 ["buckets", "search-bases", "--grid", "1:2"], ["eval", "kv-retrieval", "--num-pairs", "500", "--bases", "1e4"]):
        r = attnkit(*args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, (args, r.stderr)
    r = attnkit("niah", "--bases", "1e4,2e4", "--search", "--lengths", "64", "--depths", "50")
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr  # the search would drop --bases unsaid


def test_niah_with_buckets_one_base_equals_plain_niah(tmp_path):
    """`attnkit niah --bases` runs the grid twice; buckets made of the model's own base alone must
    answer exactly as plain greedy decoding does, and rows resume per system."""
    out = tmp_path / "n.jsonl"
    args = ("niah", "--needles", "passkey", "--lengths", "256", "--depths", "0,100", "--out", str(out), "--json")
    r = attnkit(*args, "--bases", "10000")
    assert r.returncode == 0, r.stderr
    both = json.loads(r.stdout)
    plain = json.loads(attnkit("niah", "--needles", "passkey", "--lengths", "256", "--depths", "0,100", "--json").stdout)
    assert both["grid"] == both["buckets"]["grid"] == plain["grid"]
    assert both["buckets"]["bases"] == [10000.0]
    rows = [json.loads(line) for line in result_lines(out)]
    assert sorted({r["system"] for r in rows}) == ["buckets paper 10000", "single"] and len(rows) == 2 * 12
    single = {(r["needle"], r["depth"]): r["answer"] for r in rows if r["system"] == "single"}
    assert single == {(r["needle"], r["depth"]): r["answer"] for r in rows if r["system"] != "single"}
    attnkit(*args, "--bases", "10000")  # a rerun resumes: nothing is appended
    assert len(result_lines(out)) == 2 * 12
