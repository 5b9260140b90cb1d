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


def test_a_rerun_may_add_systems_and_runs_only_theirs(tmp_path):
    """Settings equal but for a system added (the old ones unchanged): the old rows stay, only the new
    system's cells run, and the first line names every system; a changed old system is refused."""
    out = tmp_path / "s.jsonl"
    calls = []

    def work(cell):
        calls.append((cell["system"], cell["i"]))
        return {"v": cell["i"] * (1 if cell["system"] == "a" else 10)}

    def cells(names):
        return [{"system": n, "i": i} for n in names for i in range(3)]

    run_grid(cells(["a"]), ("system", "i"), work, out, quiet=True, settings={"k": 1, "systems": {"a": {"x": 1}}})
    calls.clear()
    rows = run_grid(cells(["a", "b"]), ("system", "i"), work, out, quiet=True,
                    settings={"k": 1, "systems": {"a": {"x": 1}, "b": {"x": 2}}})
    assert calls == [("b", 0), ("b", 1), ("b", 2)] and len(rows) == 6
    assert json.loads(out.read_text().splitlines()[0])["attnkit_run"]["systems"] == {"a": {"x": 1}, "b": {"x": 2}}
    assert len(result_lines(out)) == 6
    for settings in ({"k": 1, "systems": {"a": {"x": 9}, "b": {"x": 2}, "c": {}}},  # an old system changed
                     {"k": 2, "systems": {"a": {"x": 1}, "b": {"x": 2}, "c": {}}},  # another setting changed
                     {"k": 1, "systems": {"a": {"x": 1}}}):  # a system left out is another run
        with pytest.raises(AttnkitError, match="other settings"):
            run_grid(cells(["a"]), ("system", "i"), work, out, quiet=True, settings=settings)
    assert len(result_lines(out)) == 6 and not (tmp_path / "s.jsonl.tmp").exists()
