import json
import subprocess
import sys

from transformers import AutoTokenizer

from attnkit.core.loading import EMBEDDED_DIR
from conftest import result_lines, run_cli, tiny_model


def attnkit(*args):
    return run_cli(*args)


def test_main_prints_one_line_errors_without_traceback(tmp_path):
    """The one test that runs the real entry point in a subprocess."""
    for args in (["info", str(tmp_path / "missing")], ["niah", "--lengths", "a,b"]):
        r = subprocess.run([sys.executable, "-m", "attnkit.cli", *args], capture_output=True, text=True)
        assert r.returncode == 2
        assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error:"), r.stderr


def test_the_command_line_starts_without_torch():
    """`attnkit --help` stays fast because importing the CLI imports neither torch nor numpy."""
    code = "import sys, attnkit.cli; print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_info_json_on_embedded():
    r = attnkit("info", "embedded", "--json")
    facts = json.loads(r.stdout)
    assert facts["layers"] == 8 and facts["query_heads"] == 8 and facts["max_positions"] >= 2048
    assert facts["parameters"] < 10_000_000


def test_user_errors_are_one_line_without_traceback(tmp_path):
    for args in (["info", str(tmp_path / "missing")], ["info", str(tmp_path)],
                 ["niah", "--lengths", "99999"], ["niah", "--lengths", "a,b"]):
        r = attnkit(*args)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error:"), r.stderr


def test_not_a_causal_lm_and_missing_tokenizer(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32).save_pretrained(tmp_path / "vit")
    r = attnkit("niah", "--model", str(tmp_path / "vit"))
    assert "not a causal language model" in r.stderr
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    r = attnkit("niah", "--model", str(tmp_path / "llama"))
    assert "no usable tokenizer" in r.stderr
    (tmp_path / "empty").mkdir()
    tiny_model("llama").config.save_pretrained(tmp_path / "empty")
    AutoTokenizer.from_pretrained(EMBEDDED_DIR).save_pretrained(tmp_path / "empty")
    r = attnkit("niah", "--model", str(tmp_path / "empty"))
    assert "cannot load weights" in r.stderr and "Traceback" not in r.stderr


def test_niah_json_plot_and_out(tmp_path):
    out, png = tmp_path / "r.jsonl", tmp_path / "h.png"
    r = attnkit("niah", "--lengths", "256,512", "--depths", "0,100", "--json", "--out", str(out), "--plot", str(png))
    summary = json.loads(r.stdout)
    assert summary["trials"] == 12 and len(summary["grid"]) == 4
    assert len(result_lines(out)) == 12 and png.stat().st_size > 1000
