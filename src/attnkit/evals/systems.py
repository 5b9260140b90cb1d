"""What an evaluation compares: named systems, each a technique of `core.generate` (None: the model as
it is) with the fields that tell its rows apart in a shared results file. Every task (NIAH,
key-value retrieval) answers through `core.generate` with the system's technique, so any technique
runs on any task."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class System:
    name: str
    fields: dict = field(default_factory=dict)  # row fields (and result-file settings) naming this system
    technique: object = None  # a technique record (HeadKVConfig, BucketsConfig, Intervention, ...) or None

    def describe(self) -> dict:
        return self.technique.describe() if self.technique is not None else {"technique": "plain"}


def technique_systems(choice, record, model, task: str = "NIAH") -> list:
    """The evaluation systems of a registered technique (`core.registry.Choice` and its built record):
    the plain model alone (named `task`), the entry's own list (Buckets: the model's own base beside
    it), or one system named `task, label` whose rows carry the label in the entry's row field."""
    from attnkit.core.registry import entry

    if choice.name == "plain":
        return [System(task)]
    e, name = entry(choice.name), choice.label(record)
    if e.systems is not None:
        return e.systems(record, model, name)
    return [System(f"{task}, {name}", {e.row_field: name}, record)]
