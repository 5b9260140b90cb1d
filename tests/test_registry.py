"""The technique registry: a technique registered here (a toy logit bias) runs through `attnkit niah`
and `attnkit serve` (real HTTP) without a line of theirs changed; settings are typed and checked
before any weights load; the built-ins spell their older options through it."""

import json
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import torch
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.core import registry
from attnkit.core.generate import Session, answer_text, generate
from attnkit.errors import AttnkitError
from attnkit.evals import niah as N
from conftest import result_lines


@dataclass(frozen=True)
class LogitBias:
    bias: tuple  # ((token id, added logit), ...)

    @contextmanager
    def prepare(self, model):
        yield BiasSession(model, dict(self.bias))

    def describe(self) -> dict:
        return {"technique": "logit bias", "tokens": len(self.bias)}


class BiasSession(Session):
    def __init__(self, model, bias):
        super().__init__(model)
        self.ids, self.add = torch.tensor(list(bias)), torch.tensor(list(bias.values()))

    def scores(self, logits):
        return logits.index_add(-1, self.ids, self.add.expand(len(logits), -1).to(logits.dtype)), None


def _build(model_config, s):
    if not s["tokens"]:
        raise AttnkitError("logit-bias: give tokens=ID,ID")
    return LogitBias(tuple((int(t), s["bias"]) for t in s["tokens"]))


@pytest.fixture
def toy():
    entry = registry.register(registry.Entry(
        "logit-bias", "adds a bias to some tokens' logits",
        (registry.Option("tokens", list, [], "token ids, comma-separated"),
         registry.Option("bias", float, -1e9, "added logit")),
        build=_build, label=lambda rec, s: f"bias {len(rec.bias)} tokens"))
    yield entry
    registry.unregister("logit-bias")


def _first_answer_tokens(model, tok, needles, hay):
    """The ids the plain answer may start with (with and without a leading space), and the answer."""
    answer = N.evaluate_niah(model, tok, needles, hay, [256], [50], quiet=True)[0]["answer"]
    starts = {tok(text, add_special_tokens=False)["input_ids"][0] for text in (answer, " " + answer)}
    return sorted(starts), answer


def test_a_registered_technique_runs_through_niah(toy, embedded, tmp_path):
    model, tok = embedded
    needles, hay = N.passkey_needles()[:1], N.load_haystack()
    first, plain = _first_answer_tokens(model, tok, needles, hay)
    out = tmp_path / "n.jsonl"
    r = CliRunner().invoke(app, ["niah", "--technique", "logit-bias", "--set", f"tokens={','.join(map(str, first))}", "--needles",
                                 "passkey", "--lengths", "256", "--depths", "50", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    row = json.loads(result_lines(out)[0])
    library = N.evaluate_niah(model, tok, needles, hay, [256], [50], quiet=True,
                              technique=LogitBias(tuple((t, -1e9) for t in first)))[0]["answer"]
    assert row["technique"] == f"bias {len(first)} tokens" and row["answer"] == library != plain
    assert json.loads(r.stdout)["trials"] == len(result_lines(out)) == len(N.passkey_needles())


def test_a_registered_technique_is_served_over_http(toy, embedded):
    """`build_engine` (what `attnkit serve` runs) takes the registered technique by name; a chat request
    over HTTP gets the library's answer with it, and the plain model's answer without its first token."""
    from test_serve import Running

    from attnkit.serve.app import _tokenize, local_app, turn_stops
    from attnkit.serve.cli import build_engine

    model, tok = embedded
    messages = [{"role": "user", "content": "The password of Dunmore is blue cabin. What is the password of Dunmore?"}]
    ids = torch.tensor([_tokenize(tok, messages)])
    stops = tuple(turn_stops(tok))
    first = generate(model, tok, ids, None, max_new_tokens=1, stop_rule="eos").ids[0][0]
    banned = LogitBias(((first, -1e9),))
    expected = answer_text(tok, generate(model, tok, ids, None, banned, 8, stop_rule="eos", stop_strings=stops).ids[0],
                           stops)
    engine = build_engine("embedded", registry.choice("logit-bias", [f"tokens={first}"]), max_queue=8)
    server = Running(local_app(engine, "embedded", max_body=1 << 20))
    try:
        r = httpx.post(server.url + "/chat/completions", timeout=60,
                       json={"model": "embedded", "messages": messages, "max_tokens": 8, "temperature": 0})
        models = httpx.get(server.url + "/models", timeout=30).json()
    finally:
        server.stop()
        engine.close(wait=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip() == expected
    assert models["data"][0]["attnkit"]["technique"] == "logit bias"


def test_settings_are_typed_and_checked_before_the_weights_load(toy, monkeypatch):
    import attnkit.core.loading as L

    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("weights loaded before the settings were checked"))
    cases = [(["--technique", "logit-bias"], "give tokens"),
             (["--technique", "logit-bias", "--set", "bias=high"], "not a float"),
             (["--technique", "logit-bias", "--set", "colour=red"], "KEY one of tokens, bias"),
             (["--technique", "nope"], "unknown technique 'nope'"),
             (["--set", "tokens=1"], "--set needs --technique"),
             (["--technique", "logit-bias", "--kv-choose", "none"], "not both"),
             (["--technique", "buckets", "--set", "bases=10000", "--set", "search=true"], "not both"),
             (["--technique", "kv-cache", "--set", "window=0"], "window must be >= 1")]
    for args, message in cases:
        r = CliRunner().invoke(app, ["niah", "--lengths", "256", "--depths", "50", *args])
        assert isinstance(r.exception, AttnkitError) and message in str(r.exception), (args, r.output)


def test_parse_fills_defaults_and_types_every_kind(toy):
    s = registry.parse("kv-cache", ["scores=a.json,b.json", "full=0.5", "recipe=off", "head_tokens=64"])
    assert s["scores"] == ["a.json", "b.json"] and s["full"] == 0.5 and s["recipe"] is False
    assert s["head-tokens"] == 64 and s["window"] == 128  # underscores read as dashes; defaults kept
    with pytest.raises(AttnkitError, match="not a bool"):
        registry.parse("kv-cache", ["recipe=maybe"])
    with pytest.raises(AttnkitError, match="already registered"):
        registry.register(registry.Entry("logit-bias", "again", build=_build))
    assert {"plain", "kv-cache", "buckets", "logit-bias"} <= set(registry.names())
    r = CliRunner().invoke(app, ["techniques", "--json"])
    listed = {t["name"]: t for t in json.loads(r.stdout)["techniques"]}
    assert [o["name"] for o in listed["logit-bias"]["settings"]] == ["tokens", "bias"]


def test_the_older_options_and_the_registry_choose_the_same_cache(tmp_path, embedded):
    """`--kv-scores F --kv-full 0.5` and `--technique kv-cache --set scores=F --set full=0.5` write rows
    of the same name (an old result file resumes) and the same heads."""
    from attnkit.heads import scores as S

    S.save_scores({(l, h): [0.9 if (l, h) == (5, 0) else 0.0] for l in range(8) for h in range(8)},
                  tmp_path / "copy.json")
    common = ["niah", "--needles", "passkey", "--lengths", "256", "--depths", "50", "--json"]
    old = CliRunner().invoke(app, [*common, "--kv-scores", str(tmp_path / "copy.json"), "--kv-full", "0.5",
                                   "--out", str(tmp_path / "a.jsonl")])
    new = CliRunner().invoke(app, [*common, "--technique", "kv-cache", "--set", f"scores={tmp_path / 'copy.json'}",
                                   "--set", "full=0.5", "--out", str(tmp_path / "b.jsonl")])
    assert old.exit_code == 0 and new.exit_code == 0, old.output + new.output
    assert json.loads(old.stdout)["cache"] == json.loads(new.stdout)["cache"]
    a, b = (json.loads(result_lines(tmp_path / f)[0]) for f in ("a.jsonl", "b.jsonl"))
    assert a["cache"] == b["cache"] and a["answer"] == b["answer"]


def test_the_demo_runs_a_registered_technique_beside_the_plain_model(toy, embedded, tmp_path, monkeypatch):
    """`attnkit demo --technique NAME --set K=V`: the settings are checked before any step runs; the
    fifth step answers the same passkey prompts with the technique and without."""
    import attnkit.demo as D

    monkeypatch.setattr(D, "run", lambda *a, **k: pytest.fail("the demo ran before its settings were checked"))
    r = CliRunner().invoke(app, ["demo", "--technique", "logit-bias", "--set", "bias=high"])
    assert isinstance(r.exception, AttnkitError) and "not a float" in str(r.exception)
    monkeypatch.undo()
    model, tok = embedded
    needles, hay = N.passkey_needles()[:1], N.load_haystack()
    first, plain = _first_answer_tokens(model, tok, needles, hay)
    choice = registry.choice("logit-bias", [f"tokens={','.join(map(str, first))}"])
    D.technique_step(model, tok, choice, choice.build(model.config), needles, hay, tmp_path)
    rows = [json.loads(x) for x in result_lines(tmp_path / "technique.jsonl")]
    ours = [r for r in rows if r.get("technique") == f"bias {len(first)} tokens"]
    theirs = [r for r in rows if "technique" not in r]
    assert len(ours) == len(theirs) == 9  # 3 lengths x 3 depths, one needle, each system
    key = lambda r: (r["length"], r["depth"])  # noqa: E731
    pairs = [(t["answer"], o["answer"]) for t, o in zip(sorted(theirs, key=key), sorted(ours, key=key))]
    assert sum(a != b for a, b in pairs) >= len(pairs) // 2  # the banned first token changes the answers


def test_head_masks_by_name_equal_the_mask_they_spell_and_are_checked_before_loading(embedded, tmp_path):
    """`--technique head-mask` builds the `Intervention` a user would write by hand (heads named, or a
    score file's top heads, or random non-retrieval heads for the control); bad heads fail from the
    config alone; through `niah` the masked model answers as the hand-built mask does."""
    from attnkit.core.hook import HeadMask, Intervention
    from attnkit.core.loading import load_config
    from attnkit.heads import scores as S

    config = load_config("embedded")
    named = registry.choice("head-mask", ["heads=5-0,6-3", "mode=zero"]).build(config)
    assert named == Intervention(HeadMask(frozenset({(5, 0), (6, 3)}), "zero", "decode"))
    scores = {(l, h): [0.9 - 0.1 * h if l == 5 else 0.0] for l in range(8) for h in range(8)}
    S.save_scores(scores, tmp_path / "s.json")
    top = registry.choice("head-mask", [f"scores={tmp_path / 's.json'}", "top=3"]).build(config)
    assert top.mask.heads == {(5, 0), (5, 1), (5, 2)}
    control = registry.choice("head-mask", [f"scores={tmp_path / 's.json'}", "random=3", "seed=1"]).build(config)
    assert len(control.mask.heads) == 3 and not control.mask.heads & {(5, h) for h in range(8)}
    for bad, message in ((["heads=99-0"], "outside the model"), (["heads=5"], "LAYER-HEAD"), (["top=2"], "score file"),
                         ([], "no heads")):
        with pytest.raises(AttnkitError, match=message):
            registry.choice("head-mask", bad).build(config)
    model, tok = embedded
    grid = N.Grid(N.load_needles("passkey"), N.load_haystack(None), [256], [50])
    by_hand = N.compare_systems(model, tok, grid, [N.System("mask", {}, named)], None, quiet=True)["mask"]
    r = CliRunner().invoke(app, ["niah", "--lengths", "256", "--depths", "50", "--needles", "passkey", "--json",
                                 "--technique", "head-mask", "--set", "heads=5-0,6-3", "--set", "mode=zero"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["recalls"] == by_hand["recalls"]
