"""The `attnkit` command line: it only mounts each package's commands."""

from __future__ import annotations

import sys

import typer

from attnkit.buckets.cli import buckets_app
from attnkit.cli_common import console
from attnkit.app.cli import demo, info, models_app, techniques
from attnkit.errors import AttnkitError
from attnkit.evals.cli import eval_app, niah
from attnkit.heads.cli import heads_app
from attnkit.kvcache.cli import kv_app
from attnkit.reproduce.cli import reproduce
from attnkit.s2a.cli import s2a_app
from attnkit.serve.cli import serve

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fix and explain how LLMs use their context.")


@app.callback()
def _show_progress_lines():
    # library progress lines (attnkit.core.say) go to stderr for every command
    from attnkit.core.say import show
    show()


app.command("info")(info)
app.command("techniques")(techniques)
app.command("niah")(niah)
app.command("demo")(demo)
app.command("serve")(serve)
app.command("reproduce")(reproduce)
app.add_typer(models_app, name="models")
app.add_typer(heads_app, name="heads")
app.add_typer(kv_app, name="kv")
app.add_typer(buckets_app, name="buckets")
app.add_typer(eval_app, name="eval")
app.add_typer(s2a_app, name="s2a")


def main() -> None:
    try:
        app()
    except AttnkitError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
    except ModuleNotFoundError as e:  # an install that lost a dependency: say how to mend it
        console.print(f"[red]error:[/red] the Python package '{e.name}' is missing; reinstall attnkit "
                      "with `pip install -e .` (or `pip install attnkit`)", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; finished results are kept")
        sys.exit(130)


if __name__ == "__main__":
    main()
