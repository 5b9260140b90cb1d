"""Resumable grids of trials: each finished cell is appended to a JSONL file at once."""

from __future__ import annotations

import json
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def cell_key(row: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(row[f] for f in fields)


def load_done(path: Path | None, fields: tuple[str, ...]) -> dict[tuple, dict]:
    """Rows already in the results file, by key; a truncated last line (a killed run) is ignored."""
    done = {}
    if path is None or not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            done[cell_key(row, fields)] = row
        except (json.JSONDecodeError, KeyError):
            continue
    return done


def progress_bar(quiet: bool = False) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=quiet, transient=False)


def run_grid(cells: list[dict], fields: tuple[str, ...], work, out: Path | None = None,
             description: str = "trials", quiet: bool = False) -> list[dict]:
    """Run `work(cell) -> row` for every cell not already in `out`; return all rows in cell order."""
    done = load_done(out, fields)
    rows = []
    handle = open(out, "a") if out is not None else None
    try:
        with progress_bar(quiet) as bar:
            task = bar.add_task(description, total=len(cells))
            for cell in cells:
                key = cell_key(cell, fields)
                if key not in done:
                    row = {**cell, **work(cell)}
                    done[key] = row
                    if handle:
                        handle.write(json.dumps(row) + "\n")
                        handle.flush()
                rows.append(done[key])
                bar.advance(task)
    finally:
        if handle:
            handle.close()
    return rows
