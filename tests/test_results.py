"""Result files record what produced them: no mixing of runs, torn lines cut, one writer at a time."""

import json

import pytest
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.errors import AttnkitError
from attnkit.evals import niah as N
from attnkit.evals.runner import ResultFile, run_grid
from conftest import result_lines, tiny_model


def test_settings_head_the_file_and_other_settings_are_refused(tmp_path, embedded):
    model, tok = embedded
    out = tmp_path / "r.jsonl"
    needles, hay = N.passkey_needles()[:1], N.load_haystack()
    N.evaluate_niah(model, tok, needles, hay, [256], [50], out=out, quiet=True)
    header = json.loads(out.read_text().splitlines()[0])["attnkit_run"]
    assert header["kind"] == "niah" and header["model"].endswith("embedded") and header["lengths"] == [256]
    with pytest.raises(AttnkitError, match="needles"):
        N.evaluate_niah(model, tok, N.passkey_needles(seed=1)[:1], hay, [256], [50], out=out, quiet=True)
    with pytest.raises(AttnkitError, match="lengths: \\[256\\] in the file, \\[512\\] now"):
        N.evaluate_niah(model, tok, needles, hay, [512], [50], out=out, quiet=True)
    other = tiny_model("llama", 2)
    other.config.max_position_embeddings = 4096
    with pytest.raises(AttnkitError, match="model"):
        N.evaluate_niah(other, tok, needles, hay, [256], [50], out=out, quiet=True)
    assert len(result_lines(out)) == 1  # nothing was appended by the refused runs
    r = CliRunner().invoke(app, ["niah", "--needles", "passkey", "--lengths", "256", "--depths", "50", "--out", str(out)])
    assert isinstance(r.exception, AttnkitError) and "other settings" in str(r.exception)


def test_torn_lines_are_cut_and_foreign_files_refused(tmp_path):
    out = tmp_path / "g.jsonl"
    cells = [{"i": i} for i in range(3)]
    run_grid(cells, ("i",), lambda c: {"sq": c["i"] ** 2}, out, quiet=True, settings={"s": 1})
    out.write_text(out.read_text() + '{"i": 3, "sq"')  # a crash mid-write
    rows = run_grid(cells + [{"i": 3}], ("i",), lambda c: {"sq": c["i"] ** 2}, out, quiet=True, settings={"s": 1})
    assert [r["sq"] for r in rows] == [0, 1, 4, 9]
    assert [json.loads(x)["i"] for x in result_lines(out)] == [0, 1, 2, 3]
    foreign = tmp_path / "f.jsonl"
    foreign.write_text('{"i": 0, "sq": 0}\n')
    with pytest.raises(AttnkitError, match="settings line"):
        run_grid(cells, ("i",), lambda c: {}, foreign, quiet=True, settings={"s": 1})


def test_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "l.jsonl"
    with ResultFile(out, {"s": 1}):
        with pytest.raises(AttnkitError, match="another attnkit process"):
            with ResultFile(out, {"s": 1}):
                pass
    with ResultFile(out, {"s": 1}) as again:  # released when the first run ends
        assert again.done == []
