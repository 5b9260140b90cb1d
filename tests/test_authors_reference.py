"""`heads detect --prompt authors --count repeats` against a literal port of the retrieval-head authors'
detection loop (nightdessert/Retrieval_Head, retrieval_head_detection.py), written here without any of
attnkit's detection code: their prompt construction, prefill of all prompt tokens but the last, a
decode loop that starts from that token with eager attention and output_attentions, a top-1 read per
layer and head, their span search, their accumulation, their ROUGE filter."""

import glob
import json

import pytest
import torch

from attnkit.core.decode import cache_kwarg
from rouge_score import rouge_scorer
from transformers import DynamicCache

from attnkit.evals import niah as N
from attnkit.heads import detect as D


class AuthorsPort:
    def __init__(self, model, tok, lengths):
        self.model, self.enc, self.lengths = model, tok, lengths
        self.layers, self.heads = model.config.num_hidden_layers, model.config.num_attention_heads
        self.head_counter = {f"{l}-{h}": [] for l in range(self.layers) for h in range(self.heads)}
        self.scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        # their period tokens are Llama ids ("." and "▁."); for another tokenizer: every token that is a period
        self.periods = [i for i in range(len(tok)) if tok.decode([i]).strip() == "."]

    def read_context(self, haystack):
        context = ""
        while len(context.split()) < max(self.lengths):
            context += haystack
        return context

    def generate_context(self, haystack, needle, length, depth):
        context = self.read_context(haystack)
        tokens = self.enc.encode(context)
        if len(tokens) > length:
            context = self.enc.decode(tokens[:length])
        tokens_needle = self.enc.encode(needle)
        tokens_context = self.enc.encode(context)
        length -= 200
        if len(tokens_context) + len(tokens_needle) > length:
            tokens_context = tokens_context[:length - len(tokens_needle)]
        if depth == 100:
            new = tokens_context + tokens_needle
        else:
            point = int(len(tokens_context) * (depth / 100))
            new = tokens_context[:point]
            while new and new[-1] not in self.periods:
                point -= 1
                new = tokens_context[:point]
            new += tokens_needle + tokens_context[point:]
        return self.enc.decode(new)

    def find_needle(self, prompt_ids, real):
        # SentencePiece (their Llama tokenizer) encodes the answer alone with the leading-space pieces it has
        # in running text; a byte-level BPE tokenizer needs the space written out
        for spelling in (real, " " + real):
            needle_ids = self.enc(spelling, add_special_tokens=False)["input_ids"]
            for i in range(len(prompt_ids)):
                span = set(prompt_ids[i:i + len(needle_ids)].tolist())
                if len(span & set(needle_ids)) / len(set(needle_ids)) > 0.9:
                    return i, i + len(needle_ids)
        return -1, -1

    def trial(self, haystack, needle, length, depth):
        context = self.generate_context(haystack, needle["needle"], length, depth)
        question = f"Based on the content of the book, Question: {needle['question']}\nAnswer:"
        input_ids = self.enc(context + question, return_tensors="pt")["input_ids"]
        prompt_ids = input_ids[0]
        start, end = self.find_needle(prompt_ids, needle["real_needle"])
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(input_ids=input_ids[:, :-1], **cache_kwarg(self.model, cache), use_cache=True)
            inp, output = input_ids[:, -1], []
            score = [[0.0] * self.heads for _ in range(self.layers)]
            for _ in range(50):
                out = self.model(input_ids=inp.view(1, 1), **cache_kwarg(self.model, cache), use_cache=True, output_attentions=True)
                inp = out.logits[0, -1].argmax()
                output.append(inp.item())
                for l in range(self.layers):
                    for h in range(self.heads):
                        values, idx = out.attentions[l][0][h][-1].topk(1)
                        for v, i in zip(values, idx):
                            if start <= i < end and inp.item() == prompt_ids[i].item():
                                score[l][h] += 1 / (end - start)
                                break
                if self.enc.decode([inp.item()]) == "\n":  # their test: the token is <0x0A>
                    break
        response = self.enc.decode(output, skip_special_tokens=True).strip()
        recall = self.scorer.score(needle["real_needle"], response)["rouge1"].recall * 100
        if recall > 50:
            for l in range(self.layers):
                for h in range(self.heads):
                    self.head_counter[f"{l}-{h}"].append(score[l][h])
        return input_ids[0].tolist(), recall


def _check(model, tok, needles, haystacks, lengths, depths):
    port = AuthorsPort(model, tok, lengths)
    base = model.config._attn_implementation
    model.set_attn_implementation("eager")  # output_attentions needs the eager path, as their code ran
    try:
        reference = [port.trial(haystacks[i], needles[i], L, d) for L in lengths for d in depths
                     for i in range(len(needles))]
    finally:
        model.set_attn_implementation(base)
    objs = [N.Needle(n["needle"], n["question"], n["real_needle"]) for n in needles]
    for n, (i, L, d) in enumerate((i, L, d) for L in lengths for d in depths for i in range(len(needles))):
        builder = N.prompt_builder("authors", tok, haystacks[i], min_words=max(lengths))
        assert builder.build(objs[i], L, d).input_ids[0].tolist() == reference[n][0], (i, L, d)
    per_head, rows = D.detect(model, tok, objs, haystacks, lengths, depths, count="repeats", first_token=True,
                              prompt="authors", quiet=True)
    assert [r["recall"] for r in rows] == pytest.approx([r[1] for r in reference])
    counted = len(next(iter(port.head_counter.values())))
    assert counted >= 2, "the grid should have trials that count"
    for (l, h), scores in per_head.items():
        assert scores == pytest.approx(port.head_counter[f"{l}-{h}"], abs=1e-6)
    return rows


@pytest.mark.slow
def test_detect_equals_the_authors_loop_on_passkey_needles(embedded):
    model, tok = embedded
    needles = [{"needle": n.needle, "question": n.question, "real_needle": n.real_needle} for n in N.passkey_needles()[:3]]
    hay = N.load_haystack()
    rows = _check(model, tok, needles, [hay] * 3, [512, 768], [0, 50, 100])
    assert all(isinstance(r["answer"], str) for r in rows) and any(r["recall"] > 50 for r in rows)


@pytest.mark.slow
def test_detect_equals_the_authors_loop_on_their_detection_files(embedded, shared_data):
    model, tok = embedded
    root = shared_data / "retrieval_head" / "haystack_for_detect"
    needles = [json.loads(line) for line in (root / "needles.jsonl").read_text().splitlines()]
    hays = ["".join(open(f).read() for f in glob.glob(str(root / f"part{i}" / "*.txt"))) for i in (1, 2, 3)]
    _check(model, tok, needles, hays, [512], [0, 50, 100])


def test_the_authors_prompt_carries_their_artefacts(embedded):
    _, tok = embedded
    needle = N.passkey_needles()[0]
    built = N.prompt_builder("authors", tok, N.load_haystack(), min_words=512).build(needle, 512, 50)
    ids = built.input_ids[0].tolist()
    assert ids.count(tok.bos_token_id) == 4  # the tokenizer's, two from decoded "<s>" text, the needle's own
    bos = [i for i, t in enumerate(ids) if t == tok.bos_token_id]
    needle_ids = tok.encode(needle.needle, add_special_tokens=False)
    assert ids[bos[-1] + 1:bos[-1] + 1 + len(needle_ids)] == needle_ids  # the needle follows its own BOS
    assert tok.decode(ids[bos[-1] - 1:bos[-1]]).strip() == "."  # placed right after a period, no space
    assert len(ids) < 512 - 150  # their fixed 200-token buffer, less the question
    clean = N.prompt_builder("clean", tok, N.load_haystack()).build(needle, 512, 50).input_ids[0].tolist()
    assert clean.count(tok.bos_token_id) == 1 and len(clean) > len(ids)
