"""The `attnkit reproduce` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from attnkit.cli_common import CHAT_TEMPLATE, DEVICE, DEVICE_MAP, DTYPE, MODEL_HELP, console, quiet_transformers
from attnkit.errors import AttnkitError


def reproduce(model: str = typer.Option("smollm2-135m-instruct", help=MODEL_HELP),
              quick: bool = typer.Option(False, "--quick", help="the small study (<= 10 min on 2 CPU cores for "
                                                                 "SmolLM2); the same as --profile quick"),
              profile: str = typer.Option("full", help="study size: quick, full (24 prompts per cell), or cpu-1.5b "
                                                       "(full, sized for a 1.5B model on 2 CPU cores)"),
              only: str = typer.Option("heads,ablate,kv,buckets,s2a", help="steps to run, comma-separated"),
              out: Path = typer.Option(Path("attnkit-reproduce"), help="results, figures and report.md / report.html"),
              data: Optional[Path] = typer.Option(None, help="folder with lost_in_the_middle/nq-open-oracle.jsonl.gz and "
                                                             "gsm8k/gsm8k_validation.jsonl (the S2A step)"),
              s2a_backend: Optional[str] = typer.Option(None, help="run the S2A step against this OpenAI-compatible URL"),
              s2a_model: Optional[str] = typer.Option(None, help="the model name the --s2a-backend serves"),
              api_key_env: str = typer.Option("OPENAI_API_KEY", help="--s2a-backend: env variable with the key"),
              chat_template: Optional[bool] = CHAT_TEMPLATE,
              device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
              settings_file: Optional[Path] = typer.Option(None, "--settings", help="JSON file of study settings "
                                                           "(fields of StudySettings) over --quick's or the full study's"),
              report_only: bool = typer.Option(False, help="rebuild the report from the result files in --out")):
    """Retrieval heads, the retrieval-head KV cache, Attention Buckets and S2A tested on one model:
    each paper's claim, its figure and ours, in DIR/report.md and a self-contained report.html."""
    from dataclasses import replace

    from attnkit.reproduce import study as ST
    from attnkit.reproduce.report import build_report

    command = "attnkit reproduce " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["reproduce"] else ""
    if report_only:
        console.print(f"report: {build_report(out, command)}", highlight=False)
        return
    steps = tuple(s.strip() for s in only.split(",") if s.strip())
    bad = [s for s in steps if s not in ST.STEPS]
    if bad or not steps:
        raise AttnkitError(f"--only: unknown step {bad[0] if bad else '(none)'}; choose among {', '.join(ST.STEPS)}")
    if data is not None and not data.is_dir():
        raise AttnkitError(f"--data {data} is not a folder")
    if (s2a_backend is None) != (s2a_model is None):
        raise AttnkitError("give --s2a-backend and --s2a-model together")
    if profile not in ST.PROFILES:
        raise AttnkitError(f"--profile must be one of {', '.join(ST.PROFILES)}, not {profile!r}")
    settings = replace(ST.QUICK if quick else ST.PROFILES[profile], chat_template=chat_template)
    if settings_file is not None:
        settings = ST.settings_from_file(settings_file, settings)
    quiet_transformers()
    from attnkit.core.loading import load_model, model_identity

    mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
    backend = None
    if s2a_backend:
        from attnkit.s2a.backends import OpenAIBackend
        backend = OpenAIBackend(s2a_backend, s2a_model, api_key_env)
    study = ST.Study(model, mdl, tok, out, settings, data, backend, command=command,
                     identity={"name": model, **model_identity(mdl)})
    ST.run_study(study, steps)
    console.print(f"report: {build_report(out, command)}", highlight=False)
