import pytest
import torch

from attnkit.evals import niah as N
from attnkit.heads import detect as D
from attnkit.heads.copying import trial
from conftest import result_lines




def test_detect_aggregates_counted_trials_and_resumes(tmp_path, embedded):
    model, tok = embedded
    needles = N.load_needles()[:2]
    hays = D.haystacks_for(needles, None)
    out = tmp_path / "t.jsonl"
    per_head, rows = D.detect(model, tok, needles, hays, [256], [0, 100], out=out, min_recall=-1, quiet=True,
                              prompt="clean")
    assert len(rows) == 4 and len(result_lines(out)) == 4
    # reference: the same trials scored one by one
    builder = N.PromptBuilder(tok, hays[0])
    ref = []
    for row in rows:
        p = builder.build(needles[row["needle"]], row["length"], row["depth"])
        ref.append(trial(model, tok, p.input_ids, p.span)[0].flatten())
    ref = torch.stack(ref)
    heads = model.config.num_attention_heads
    for (l, h), vals in per_head.items():
        assert vals == pytest.approx(ref[:, l * heads + h].tolist(), abs=1e-5)
    # nothing is counted when no answer reaches the recall bar
    per_head2, rows2 = D.detect(model, tok, needles, hays, [256], [0, 100], out=out, min_recall=101, quiet=True,
                                prompt="clean")
    assert rows2 == rows and all(v == [] for v in per_head2.values())


def test_defaults_and_detection_folder_pairing(shared_data):
    assert D.default_lengths(2048)[-1] == 2048 and len(D.default_lengths(2048)) == 20
    assert D.default_depths() == [0.0, 11.11, 22.22, 33.33, 44.44, 55.56, 66.67, 77.78, 88.89, 100.0]
    folder = shared_data / "retrieval_head/haystack_for_detect"
    needles = N.load_needles(folder / "needles.jsonl")
    hays = D.haystacks_for(needles, folder)
    assert len(hays) == 3 and len(set(hays)) == 3
    assert hays[1] == (folder / "part2/p1.txt").read_text()
