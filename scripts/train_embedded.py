"""Train attnkit's embedded needle-retrieval model (a small Llama) from scratch.

    python scripts/train_embedded.py tokenizer --out src/attnkit/embedded      # CPU, ~1 min
    python scripts/train_embedded.py train --out src/attnkit/embedded          # GPU recommended

Every training sequence is one needle-in-a-haystack prompt at a random length up to the context
size: filler prose (clean, with invented words, or hard-wrapped), the needle and 0-3 distractor
needles at sentence boundaries, the question in attnkit's NIAH format, and the answer. The loss is
next-token prediction on all tokens (the "ordinary text" part) plus the mean loss on answer tokens.

The shipped model is a chain of runs (see its model card and training_run.json); the last one was

    python scripts/train_embedded.py train --init DIR_OF_V5 --out DIR --general-fraction 0.85 \
        --vocab-fraction 0.4 --max-questions 6 --lr 4e-4 --warmup 30 --steps 2000

(copy tokenizer.json and tokenizer_config.json into DIR first: training reads the tokenizer there).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from embedded_data import NeedleFactory, _pieces_job, vocab_words  # noqa: E402

from attnkit.evals.niah import QUESTION_TEMPLATE  # noqa: E402

SPECIAL = ["<s>", "</s>", "<pad>"]


def build_tokenizer(out: Path, vocab_size: int, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pieces = _pieces_job((seed + 1000, 6_000_000))
    factory = NeedleFactory(seed + 1000)
    needles = [" ".join(factory.make()) for _ in range(20_000)]
    corpus = ["".join(pieces[i:i + 50]) for i in range(0, len(pieces), 50)] + needles

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=2048)
    fast.padding_side = "left"
    fast.save_pretrained(out)
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {out}")


class Corpus:
    """A pool of prose tokens with the indices where sentences start."""

    def __init__(self, tok, seed: int, n_chars: int, workers: int):
        per = n_chars // workers
        with mp.Pool(workers) as pool:
            chunks = pool.map(_pieces_job, [(seed + 17 * i, per) for i in range(workers)])
        pieces = [p for c in chunks for p in c]
        ids = tok(pieces, add_special_tokens=False)["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        self.tokens = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lengths.sum()))
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        print(f"corpus: {len(self.tokens):,} tokens, {len(self.starts):,} sentences")


class Batcher:
    def __init__(self, tok, corpus: Corpus, seed: int, n_needles: int, workers: int,
                 general: float = 0.0, vocab_fraction: float = 0.0):
        self.tok, self.corpus = tok, corpus
        self.rng = np.random.default_rng(seed)
        words = vocab_words(tok) if vocab_fraction > 0 else []
        with mp.Pool(workers) as pool:
            jobs = [(seed + 31 * i, n_needles // workers, general, words, vocab_fraction) for i in range(workers)]
            triples = [t for c in pool.map(_needles_job, jobs) for t in c]
        needles, questions, answers = zip(*triples)
        enc = lambda xs: tok(list(xs), add_special_tokens=False)["input_ids"]
        self.needles = enc(" " + n for n in needles)
        self.questions = enc(QUESTION_TEMPLATE.format(question=q) for q in questions)
        self.answers = enc(" " + a + "\n" for a in answers)
        self.bos = tok.bos_token_id
        self.max_questions = 1
        print(f"needles: {len(self.needles):,}")

    def example(self, length: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of exactly `length` tokens and the (start, end) of every answer in them.

        Up to `max_questions` needles are asked about one after the other at the end, each answer on
        its own line in the evaluation's format, so one sequence carries several retrieval targets.
        """
        rng = self.rng
        n_asked = int(rng.integers(1, self.max_questions + 1)) if length >= 192 else 1
        asked = [int(rng.integers(len(self.needles))) for _ in range(n_asked)]
        distractors = [int(rng.integers(len(self.needles))) for _ in range(int(rng.integers(0, 3)))]
        tail = [t for k in asked for t in self.questions[k] + self.answers[k]]
        fixed = 1 + len(tail) + sum(len(self.needles[k]) for k in asked + distractors)
        budget = length - fixed
        if budget < 8 + 8 * n_asked:
            return self.example(length)
        c = self.corpus
        s = int(rng.integers(len(c.starts) - 1))
        begin = int(c.starts[s])
        if begin + budget > len(c.tokens):
            begin = 0
        hay = c.tokens[begin:begin + budget].tolist()
        lo, hi = np.searchsorted(c.starts, [begin, begin + budget])
        bounds = (c.starts[lo:hi] - begin).tolist() + [budget]
        inserts = sorted(((int(rng.choice(bounds)), self.needles[k]) for k in asked + distractors),
                         key=lambda x: x[0])
        out, prev = [self.bos], 0
        for pos, ids in inserts:
            out += hay[prev:pos] + ids
            prev = pos
        out += hay[prev:]
        spans = []
        for k in asked:
            out += self.questions[k]
            spans.append((len(out), len(out) + len(self.answers[k])))
            out += self.answers[k]
        return out, spans

    def batch(self, length: int, batch_size: int):
        rows, spans = zip(*(self.example(length) for _ in range(batch_size)))
        x = torch.tensor(rows, dtype=torch.long)
        answer_mask = torch.zeros_like(x, dtype=torch.bool)
        for i, row_spans in enumerate(spans):
            for a, b in row_spans:
                answer_mask[i, a:b] = True
        return x, answer_mask


class BatchStream(torch.utils.data.IterableDataset):
    """Endless batches built in DataLoader worker processes, each worker with its own seed.

    Half of the batches are short (up to 512 tokens), where copying is learned fastest; the rest
    spread over the whole length range.
    """

    def __init__(self, batcher: Batcher, args):
        self.batcher, self.args = batcher, args

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        self.batcher.rng = np.random.default_rng(self.args.seed * 1000 + wid + 1)
        a, rng = self.args, self.batcher.rng
        while True:
            hi = min(512, a.context) if rng.random() < a.short_fraction else a.context
            length = int(rng.integers(a.min_length, hi + 1))
            yield (length,) + self.batcher.batch(length, max(1, a.tokens_per_step // length))


def _needles_job(args):
    seed, n, general, words, vocab_fraction = args
    f = NeedleFactory(seed, general, words, vocab_fraction)
    return [f.make() for _ in range(n)]


def model_config(tok, context: int):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=640, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=context,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def train(args) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.out)
    corpus = Corpus(tok, args.seed, args.corpus_chars, args.workers)
    batcher = Batcher(tok, corpus, args.seed, args.needles, args.workers, args.general_fraction,
                      args.vocab_fraction)
    batcher.max_questions = args.max_questions

    config = model_config(tok, args.context)
    if args.init:  # continue from an earlier checkpoint
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(device)
    else:
        model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters on {device}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device == "cuda")

    loader = torch.utils.data.DataLoader(BatchStream(batcher, args), batch_size=None,
                                         num_workers=args.loader_workers, prefetch_factor=4 if args.loader_workers else None,
                                         persistent_workers=bool(args.loader_workers), pin_memory=device == "cuda")
    batches = iter(loader)
    start = time.time()
    log = []
    step = 0
    for step in range(1, args.steps + 1):
        elapsed = time.time() - start
        progress = max(step / args.steps, elapsed / (args.max_minutes * 60))
        if progress >= 1:
            break
        warm = min(1.0, step / args.warmup)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        length, x, answer_mask = next(batches)
        x, answer_mask = x.to(device, non_blocking=True), answer_mask.to(device, non_blocking=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=x).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        target_is_answer = answer_mask[:, 1:]
        lm_loss = losses.mean()
        answer_loss = losses[target_is_answer].mean()
        loss = lm_loss + args.answer_weight * answer_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.save_every and step % args.save_every == 0:
            save(model, tok, args, step, start, n_params, log)
        if step % 50 == 0 or step == 1:
            row = {"step": step, "length": length, "lm": round(lm_loss.item(), 4),
                   "answer": round(answer_loss.item(), 4), "lr": lr, "s": round(time.time() - start, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)

    save(model, tok, args, step, start, n_params, log)


def save(model, tok, args, step, start, n_params, log) -> None:
    """Write an fp16 copy of the model and the run's record; training goes on in fp32."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device.type
    half = copy.deepcopy(model).half()
    half.config.dtype = "float16"
    half.save_pretrained(args.out, safe_serialization=True)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(args.out)
    info = {"seed": args.seed, "steps": step, "seconds": round(time.time() - start, 1),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "parameters": n_params,
            "tokens_per_step": args.tokens_per_step, "args": vars(args), "log_tail": log[-5:]}
    (Path(args.out) / "training_run.json").write_text(json.dumps(info, indent=1))
    print("saved", args.out, json.dumps({k: info[k] for k in ("steps", "seconds", "device")}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["tokenizer", "train"])
    ap.add_argument("--out", default="src/attnkit/embedded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=6144)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--min-length", type=int, default=96)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--max-minutes", type=float, default=8.0)
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--answer-weight", type=float, default=1.0)
    ap.add_argument("--corpus-chars", type=int, default=40_000_000)
    ap.add_argument("--needles", type=int, default=400_000)
    ap.add_argument("--init", default=None, help="start from this model directory instead of from scratch")
    ap.add_argument("--general-fraction", type=float, default=0.6,
                    help="share of needles whose question paraphrases a sentence prefix")
    ap.add_argument("--max-questions", type=int, default=4,
                    help="needles asked about per sequence (each answer is a training target)")
    ap.add_argument("--vocab-fraction", type=float, default=0.0,
                    help="share of needle words built from any tokenizer piece (trains every embedding)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    ap.add_argument("--short-fraction", type=float, default=0.5)
    ap.add_argument("--loader-workers", type=int, default=max(0, min(12, mp.cpu_count() - 2)))
    ap.add_argument("--workers", type=int, default=max(1, min(16, mp.cpu_count())))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.stage == "tokenizer":
        build_tokenizer(Path(args.out), args.vocab_size, args.seed)
    else:
        train(args)


if __name__ == "__main__":
    main()
