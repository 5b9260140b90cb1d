"""Head masks as a registered technique (`--technique head-mask --set heads=3-1,5-0` or `--set scores=F --set top=8`):
knock out attention heads (Wu et al.'s causal test) in any command that takes a technique."""

from __future__ import annotations

from attnkit.core.registry import Entry, Option, register

OPTIONS = (
    Option("heads", list, [], "query heads to mask as LAYER-HEAD, comma-separated"),
    Option("scores", str, "", "a retrieval-score file: mask its top heads (with top)"),
    Option("top", int, 0, "how many of the score file's best heads to mask"),
    Option("random", int, 0, "mask this many random heads outside the score file's top 100 instead (with scores)"),
    Option("seed", int, 0, "the random heads' draw"),
    Option("mode", str, "uniform", "uniform (the head's query zeroed: attention goes uniform) or zero (its output)"),
    Option("phase", str, "decode", "decode (as the retrieval-head authors masked), prefill or both"),
)


def build(model_config, s: dict):
    from attnkit.core.family import architecture
    from attnkit.core.hook import HeadMask, Intervention
    from attnkit.errors import AttnkitError

    arch = architecture(model_config)
    heads = []
    for text in s["heads"]:
        layer, dash, head = text.partition("-")
        if not dash or not layer.strip().isdigit() or not head.strip().isdigit():
            raise AttnkitError(f"head-mask: heads are LAYER-HEAD, got {text!r}")
        heads.append((int(layer), int(head)))
    if (s["top"] or s["random"]) and not s["scores"]:
        raise AttnkitError("head-mask: top and random choose from a score file: give scores=FILE")
    if s["top"] < 0 or s["random"] < 0:
        raise AttnkitError("head-mask: top and random must be >= 0")
    if s["scores"]:
        from attnkit.heads.ablate import excluded_heads, random_heads
        from attnkit.heads.scores import load_scores, ranked

        scores = load_scores(s["scores"])
        heads += [(l, h) for l, h, _ in ranked(scores)[:s["top"]]]
        if s["random"]:
            heads += random_heads(arch.layers, arch.query_heads, s["random"], excluded_heads(scores), s["seed"])
    if not heads:
        raise AttnkitError("head-mask: no heads to mask: give heads=LAYER-HEAD,... or scores=FILE with top=K")
    for layer, head in heads:
        arch.check_head(layer, head)
    return Intervention(HeadMask(frozenset(heads), s["mode"], s["phase"]))


def label(record, s: dict) -> str:
    return f"{len(record.mask.heads)} heads masked ({record.mask.mode}, {record.mask.phase})"


ENTRY = register(Entry("head-mask", "mask attention heads (their query zeroed, or their output): the causal test of "
                       "retrieval heads", OPTIONS, build, label=label, row_field="mask",
                       vllm="head masks replace attnkit's attention function inside the model; vLLM runs its own "
                            "attention kernels"))
