"""The retrieval-head authors' NIAH prompt, token for token, for any tokenizer.

Their detection script (nightdessert/Retrieval_Head, `retrieval_head_detection.py`) builds a prompt
in a way whose side effects change which trials count and the scores, so attnkit reproduces it as a
named option (`prompt="authors"`) beside its own clean builder:

1. the haystack file is repeated until it has as many words as the longest context of the grid;
2. it is encoded *with* special tokens, cut to the context length, and decoded back to text, so the
   tokenizer's BOS becomes literal text ("<s>") that the next encoding turns into a BOS token again;
3. that text and the needle are each encoded with special tokens (so the needle carries a BOS of its
   own), the haystack is cut to leave a fixed 200-token buffer, and the needle tokens are inserted
   right after the last period token before the depth (depth 100: appended), with no space;
4. the tokens are decoded to text and the question "Based on the content of the book, Question: ...
   \\nAnswer:" is glued on with no separator, then the whole is encoded once more (chat models: the
   text inside "<book>...</book>" in the chat template).

With a Llama tokenizer the result holds 4 BOS tokens, one right before the needle. Their period
tokens are Llama ids (29889 ".", 869 "▁."); for any tokenizer, attnkit uses every token that decodes
to a period. Their answer-span search encodes the answer alone, which with Llama's SentencePiece
gives the same leading-space pieces the answer has in running text; a byte-level BPE tokenizer does
not, so the search also tries the answer with a leading space. Decoding then runs from the last
prompt token, stops at a token that is exactly a newline (their `<0x0A>` test) and never at EOS.
"""

from __future__ import annotations

import functools

import torch

from attnkit.core.decode import require_chat_template
from attnkit.errors import AttnkitError
from attnkit.evals.needles import NiahPrompt, locate_answer

BUFFER = 200
QUESTION = "Based on the content of the book, Question: {question}\nAnswer:"


@functools.lru_cache(maxsize=8)
def period_ids(tokenizer) -> frozenset[int]:
    """Ids of every token that is a period, with or without a space marker (Llama's 29889 and 869)."""
    return frozenset(i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == ".")


class AuthorsPromptBuilder:
    """Same interface as `niah.PromptBuilder`; see the module docstring for what differs."""

    def __init__(self, tokenizer, haystack: str, chat_template: bool = False, min_words: int = 0):
        require_chat_template(tokenizer, chat_template)
        self.tok, self.haystack, self.chat = tokenizer, haystack, chat_template
        self.min_words = min_words
        self._encoded: dict[int, tuple[str, list[int]]] = {}  # repeats -> (text, its encoding)

    def _haystack(self, length: int) -> tuple[str, list[int]]:
        need, words = max(length, self.min_words), len(self.haystack.split())
        if words == 0:
            raise AttnkitError("haystack is empty")
        repeats = max(1, -(-need // words))  # their loop appends whole files until there are enough words
        if repeats not in self._encoded:
            text = self.haystack * repeats
            self._encoded = {repeats: (text, self.tok.encode(text))}
        return self._encoded[repeats]

    def context(self, needle, length: int, depth: float) -> str:
        tok = self.tok
        text, ids = self._haystack(length)
        if len(ids) > length:
            text = tok.decode(ids[:length])
        needle_ids = tok.encode(needle.needle)
        context_ids = tok.encode(text)
        budget = length - BUFFER
        if budget - len(needle_ids) <= 0:
            raise AttnkitError(f"context length {length} leaves no room for a haystack with the authors' "
                               f"{BUFFER}-token buffer")
        if len(context_ids) + len(needle_ids) > budget:
            context_ids = context_ids[:budget - len(needle_ids)]
        if depth >= 100:
            tokens = context_ids + needle_ids
        else:
            at = int(len(context_ids) * (depth / 100))
            periods = period_ids(tok)
            while at > 0 and context_ids[at - 1] not in periods:
                at -= 1
            tokens = context_ids[:at] + needle_ids + context_ids[at:]
        return tok.decode(tokens)

    def build(self, needle, length: int, depth: float):
        tok = self.tok
        context = self.context(needle, length, depth)
        if self.chat:
            msg = [{"role": "user", "content": f"<book>{context}</book>\n" + QUESTION.format(question=needle.question)}]
            ids = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tok(context + QUESTION.format(question=needle.question))["input_ids"]
        return NiahPrompt(torch.tensor([ids]), locate_answer(tok, ids, needle), length, depth)
