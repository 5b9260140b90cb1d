import gzip
import json

import pytest

from attnkit import AttnkitError
from attnkit.evals import kv_retrieval as kv
from conftest import result_lines


def test_generated_examples_are_deterministic_and_hold_the_gold_pair():
    a, b = kv.generate_examples(3, 8, seed=1), kv.generate_examples(3, 8, seed=1)
    assert a == b and a != kv.generate_examples(3, 8, seed=2)
    for ex in a:
        assert (ex.key, ex.value) in ex.records and len(ex.records) == 8
        assert len({k for k, _ in ex.records}) == 8


@pytest.mark.parametrize("position", [0, 3, 5])
def test_gold_pair_lands_at_the_requested_position(position):
    ex = kv.generate_examples(1, 10, seed=3)[0]
    records = kv.place_gold(ex, 6, position)
    assert len(records) == 6 and records[position] == (ex.key, ex.value)
    assert [r for r in records if r[0] != ex.key] == [r for r in ex.records if r[0] != ex.key][:5]
    prompt = kv.format_prompt(records, ex.key)
    body = prompt[prompt.index("{"):prompt.index("}") + 1]
    assert list(json.loads(body).items()) == records  # the records are valid JSON, in order
    assert prompt.rstrip().endswith(f'Key: "{ex.key}"\nCorresponding value:')


def test_position_outside_the_pairs_is_an_error():
    ex = kv.generate_examples(1, 4)[0]
    with pytest.raises(AttnkitError, match="outside"):
        kv.place_gold(ex, 4, 4)
    with pytest.raises(AttnkitError, match="fewer"):
        kv.place_gold(ex, 9, 0)


def test_lost_in_the_middle_file_loads(shared_data):
    exs = kv.load_examples(shared_data / "lost_in_the_middle" / "kv-retrieval-75_keys.jsonl.gz")
    assert len(exs) == 500 and all(len(e.records) == 75 for e in exs)
    records = kv.place_gold(exs[0], 75, 40)
    assert records[40] == (exs[0].key, exs[0].value)
    template = (shared_data / "lost_in_the_middle" / "kv_retrieval.prompt").read_text()
    ours = kv.format_prompt(records, exs[0].key)
    # our template words the instruction and the key line as the published one does
    for line in ("Extract the value corresponding to the specified key in the JSON object below.",
                 "Corresponding value:"):
        assert line in template and line in ours


def test_malformed_line_names_its_number(tmp_path):
    ex = kv.generate_examples(1, 3)[0]
    good = json.dumps({"ordered_kv_records": ex.records, "key": ex.key, "value": ex.value})
    path = tmp_path / "kv.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(good + "\n{not json\n")
    with pytest.raises(AttnkitError, match=r"kv.jsonl.gz:2"):
        kv.load_examples(path)


def test_evaluate_writes_scored_rows_and_resumes(tmp_path, embedded):
    from attnkit.buckets import BucketsConfig

    model, tok = embedded
    exs = kv.generate_examples(2, 4, seed=0)
    from attnkit.evals.systems import System
    systems = [System(name, {"bases": bases}, BucketsConfig(bases))
               for name, bases in (("single", [10000.0]), ("buckets", [10000.0, 20000.0]))]
    out = tmp_path / "kv.jsonl"
    first = kv.evaluate_kv_retrieval(model, tok, exs, 4, [0, 3], systems, out=out, quiet=True)
    rows = [json.loads(x) for x in result_lines(out)]
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert r["correct"] == (exs[r["example"]].value in r["answer"])
    again = kv.evaluate_kv_retrieval(model, tok, exs, 4, [0, 3], systems, out=out, quiet=True)
    assert again == first and len(result_lines(out)) == 8
    acc = first["accuracy"]["single"]["0"]
    assert acc == 100.0 * sum(r["correct"] for r in rows if r["system"] == "single" and r["position"] == 0) / 2
