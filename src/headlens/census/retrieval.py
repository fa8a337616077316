"""Retrieval heads (Wu et al. 2024): heads that copy a needle out of a long haystack.

Probe (:func:`needle_probe`): ``[haystack ... needle ... haystack, question, answer]`` of ``seq_len`` tokens
(default 1,024), where the needle is ``"The secret words are W1 W2 ... Wm."`` with m distinct random ordinary
word tokens, inserted at a seeded depth of real text (the packaged corpus, then standard-library code), the
question is ``"What are the secret words? The secret words are"`` and the answer repeats W1..Wm
(teacher-forced).

Retrieval score of a head (the paper's): over the answer steps where the model's top-1 prediction is the
needle word it must copy, the head *copies* that word when its highest-attention key is the word's position
in the needle; score = copies / (answer steps), over all probes. Wu et al. label a head a retrieval head at
score >= 0.1.

Long probes make this the slowest score (a 1,024-token forward per probe), so it is opt-in: it is not in the
default census; run :func:`retrieval_scores` (or the ``retrieval`` type after :func:`register_retrieval`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.census.registry import HeadType, head_types, register
from headlens.data.code import stdlib_sources
from headlens.data.probes import Probe, corpus_sections, delimiter_mask, probe_kinds, register_probe, word_token_ids
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import head_frame
from headlens.interventions.ablation import custom_metric
from headlens.progress import tqdm

THRESHOLD = 0.1
QUESTION = "\nWhat are the secret words? The secret words are"


@dataclass(frozen=True)
class NeedleProbe(Probe):
    """Needle-in-a-haystack sequences (kind ``needle``): where each needle word sits and where it is answered.

    ``correct[b, i]`` (set by :func:`with_predictions`): the model's top-1 at the step before answer word i is it.
    """

    needle_pos: Tensor | None = None  # [batch, m] position of each needle word in the haystack
    answer_pos: Tensor | None = None  # [batch, m] position of each answer word (its query is one before)
    correct: Tensor | None = None  # [batch, m]


def _haystack_ids(model: HookedTransformer) -> list[int]:

    text = corpus_sections()["prose"] + "\n" + "\n".join(stdlib_sources(("textwrap.py", "difflib.py")).values())
    return model.tokenizer.encode(text, add_special_tokens=False)


def needle_probe(
    model: HookedTransformer, *, seq_len: int = 1024, n_seqs: int = 3, n_words: int = 6, seed: int = 0
) -> NeedleProbe:
    """``n_seqs`` needle-in-a-haystack sequences of exactly ``seq_len`` tokens (module doc; seeded depth and words)."""
    check_model(model)
    seq_len = check_count("seq_len", seq_len, minimum=2)
    n_seqs = check_count("n_seqs", n_seqs)
    n_words = check_count("n_words", n_words)
    seed = check_count("seed", seed, minimum=0)

    if getattr(model, "tokenizer", None) is None:
        raise HeadlensError("the needle probe needs a model with a tokenizer")
    if seq_len > model.cfg.n_ctx:
        raise HeadlensError(f"needle probe of {seq_len} tokens exceeds the model's context ({model.cfg.n_ctx})")
    tok = model.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    hay = _haystack_ids(model)
    gen = torch.Generator().manual_seed(int(seed) * 1000 + 11)
    pool = word_token_ids(model)
    hay_set = set(hay)
    pool = pool[torch.tensor([int(i) not in hay_set for i in pool])]
    rows, needles, answers = [], [], []
    for _ in range(n_seqs):
        words = pool[torch.randperm(len(pool), generator=gen)[:n_words]].tolist()
        needle = enc("\nThe secret words are") + words + enc(".\n")
        tail = enc(QUESTION) + words
        fill = seq_len - len(needle) - len(tail)
        if fill < 16:
            raise HeadlensError(
                f"needle probe: seq_len={seq_len} is too short for a haystack; use >= {len(needle) + len(tail) + 16}"
            )
        start = int(torch.randint(0, len(hay) - fill, (1,), generator=gen))
        depth = int(torch.randint(fill // 10, fill - fill // 10, (1,), generator=gen))
        body = hay[start : start + fill]
        seq = body[:depth] + needle + body[depth:] + tail
        first = depth + len(enc("\nThe secret words are"))
        rows.append(seq)
        needles.append(list(range(first, first + n_words)))
        answers.append(list(range(seq_len - n_words, seq_len)))
    tokens = torch.tensor(rows)
    mask = delimiter_mask(tok, tokens)
    return NeedleProbe("needle", tokens, mask, needle_pos=torch.tensor(needles), answer_pos=torch.tensor(answers))


def with_predictions(model: HookedTransformer, probe: NeedleProbe) -> NeedleProbe:
    """``probe`` with ``correct`` filled from the model's own top-1 predictions (one forward per sequence)."""
    check_model(model)
    import dataclasses

    correct = []
    with torch.inference_mode():
        for b in range(probe.n_seqs):
            logits = model(probe.tokens[b : b + 1].to(model.cfg.device))[0, probe.answer_pos[b] - 1].cpu()
            correct.append(logits.argmax(-1) == probe.tokens[b, probe.answer_pos[b]])
    return dataclasses.replace(probe, correct=torch.stack(correct))


def retrieval_seq(
    pattern: Float[Tensor, "batch head q k"], probe: NeedleProbe, rows: slice
) -> Float[Tensor, "batch head"]:
    """Per sequence: share of its answer steps where the model is right and the head's top key is the needle word."""
    needle = probe.needle_pos[rows].to(pattern.device)
    queries = probe.answer_pos[rows].to(pattern.device) - 1
    b_idx = torch.arange(pattern.shape[0], device=pattern.device)[:, None]
    top = pattern.transpose(1, 2)[b_idx, queries].argmax(-1)  # [batch, m, head]
    hit = (top == needle[..., None]) & probe.correct[rows].to(pattern.device)[..., None]
    return hit.to(pattern.dtype).mean(1)


def register_retrieval(*, replace: bool = False) -> None:
    """Opt in: add probe kind ``needle`` (3 x 1,024 tokens, whatever seq_len the census asks for) and type ``retrieval``."""

    def builder(model, *, seed, n_seqs, seq_len):
        return with_predictions(
            model, needle_probe(model, seq_len=max(seq_len, 1024), n_seqs=min(n_seqs, 3), seed=seed)
        )

    if replace or "needle" not in probe_kinds():
        register_probe("needle", builder, replace=replace)
    if replace or "retrieval" not in head_types():
        register(
            HeadType(
                "retrieval",
                "needle",
                retrieval_seq,
                THRESHOLD,
                1,
                "copies the needle word from a 1,024-token haystack (Wu et al. 2024)",
                "#2ca02c",
            ),
            replace=replace,
        )


def retrieval_scores(
    model: HookedTransformer, probe: NeedleProbe | None = None, *, seed: int = 0, progress: bool = False
):
    """Per head: retrieval score (module doc), plus attrs ``accuracy`` (model's top-1 on the answer words)."""
    check_model(model)
    probe = needle_probe(model, seed=seed) if probe is None else probe
    L, H = model.cfg.n_layers, model.cfg.n_heads
    hits = torch.zeros(L, H, dtype=torch.float64)
    n_steps, n_correct = 0, 0
    for b in tqdm(range(probe.n_seqs), desc="retrieval", disable=not progress, leave=False):
        tokens = probe.tokens[b : b + 1].to(model.cfg.device)
        patterns = {}

        def keep(pattern, hook, b=b, patterns=patterns):
            q = probe.answer_pos[b] - 1
            patterns[hook.layer()] = pattern[:, :, q.to(pattern.device)].argmax(-1).cpu()  # [1, head, m]

        with torch.inference_mode():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), keep)])
        q = probe.answer_pos[b] - 1
        correct = logits[0, q.to(logits.device)].argmax(-1).cpu() == probe.tokens[b, probe.answer_pos[b]]
        n_steps += len(q)
        n_correct += int(correct.sum())
        for layer, top in patterns.items():
            hits[layer] += ((top[0] == probe.needle_pos[b][None]) & correct[None]).sum(-1).double()
    frame = head_frame(model, retrieval=hits / n_steps)
    frame.attrs["accuracy"] = n_correct / n_steps
    return frame


def needle_metric(model: HookedTransformer, probe: NeedleProbe):
    """Mean log-probability of the answer words (teacher-forced): what masking retrieval heads should break."""
    check_model(model)
    q = probe.answer_pos - 1

    def fn(logits, tokens):
        rows = torch.arange(tokens.shape[0], device=logits.device)[:, None]
        lp = logits[rows, q.to(logits.device)].log_softmax(-1)
        return lp.gather(-1, tokens[rows, probe.answer_pos.to(logits.device)][..., None]).mean()

    return custom_metric(probe.tokens, fn, name="needle_logprob", higher_is_better=True)


def needle_accuracy(logits: Float[Tensor, "batch pos vocab"], probe: NeedleProbe) -> float:
    rows = torch.arange(probe.n_seqs)[:, None]
    pred = logits[rows, probe.answer_pos - 1].argmax(-1).cpu()
    return float((pred == probe.tokens[rows, probe.answer_pos]).float().mean())
