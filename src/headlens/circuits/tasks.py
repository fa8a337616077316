"""Tasks circuits are found on: a clean/corrupted prompt pair with a metric, and a separate set of prompts of the same
task whose mean activations replace what a circuit leaves out.

- ``induction``: repeated random tokens ``[P A A]`` vs ``[P B A]`` (:func:`headlens.interventions.patching.induction_pair`); metric:
  mean log-prob of the next token over the second half. Means: other repeated sequences (another seed).
- ``ioi``: indirect-object identification (Wang et al. 2022), generated here: "Then, Mary and John went to the store.
  John gave a drink to" -> " Mary". Names, places and objects are ones that are ONE token with their leading space
  for the model's tokenizer; the templates all have the same token count, so every prompt of a batch has the same
  length and the same layout (``S2`` and ``END`` at fixed positions). Half the prompts are ABBA ("IO and S ... S"),
  half BABA ("S and IO ... S"). Corrupted: the same sentence with three other names (Wang et al.'s "ABC"
  distribution). Metric: logit(IO) − logit(S) at the last position, mean over prompts. Means: other IOI prompts.
- ``brackets``: windows of standard-library code ending at the token before a closing ``)`` or ``]`` (the closer may
  share its token: ``):``, ``))``) whose opener is in the window (:func:`bracket_examples`); corrupted: that opener's
  bracket swapped (``(`` <-> ``[``), which swaps the right closer. Metric: logit(right closer token) − logit(the same
  token with the other bracket). Means: other such windows.
- a user pair (:func:`pair_task`): clean and corrupted texts of equal token length with answers
  (:func:`headlens.interventions.patching.text_pair`). No separate prompts exist, so only ``ablation="resample"`` applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.data.code import _file_arrays, stdlib_sources
from headlens.errors import HeadlensError, check_count, check_model
from headlens.interventions.patching import PromptPair, induction_pair, logit_diff, text_pair

TASKS = ("induction", "ioi", "brackets")

IOI_TEMPLATES = (
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Later, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "When {A} and {B} arrived at the {PLACE}, {S} then gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "After {A} and {B} had lunch at the {PLACE}, {S} gave a {OBJECT} to",
    "Yesterday {A} and {B} were at the {PLACE}, and {S} gave a {OBJECT} to",
)
"""IOI sentences; each is 15 tokens for Qwen2.5's tokenizer when every slot is one token (checked when built)."""
IOI_NAMES = (
    "Mary John Alice Bob Tom James Sarah Paul Anna David Michael Lisa Mark Emma Daniel Kevin Laura Peter Susan Robert "
    "Linda Steven Karen Jason Brian Emily Jessica Rachel Andrew Thomas Richard Maria Lucy Jack Kate Amy Sam Max Ben "
    "Dan Jim Ann Joe Tim Eric Ryan Adam Alex Chris Matt Nick Sean Mike George Henry Grace Rose Helen Frank Bill Fred "
    "Greg"
).split()
BRACKET_FILES = (
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "difflib.py",
    "pprint.py",
    "shlex.py",
    "csv.py",
    "fractions.py",
    "heapq.py",
    "bisect.py",
    "string.py",
    "calendar.py",
    "configparser.py",
    "ipaddress.py",
    "statistics.py",
    "tokenize.py",
    "ast.py",
)
"""Standard-library files the brackets task draws its windows from (a fixed set, recorded with results)."""
IOI_PLACES = "store garden park school office house market station beach restaurant hospital library kitchen".split()
IOI_OBJECTS = "drink book ring bone apple ball kiss gift pen key letter basket".split()


@dataclass(frozen=True)
class CircuitTask:
    """A prompt pair (``pair.clean``, ``pair.corrupted``, ``pair.positions``, ``pair.metric``: high on clean) and
    ``mean_tokens``, a separate ``[n_seqs, pos]`` set of prompts of the same task (None for a user pair)."""

    name: str
    pair: PromptPair
    mean_tokens: Int[Tensor, "n_mean pos"] | None
    info: dict = field(default_factory=dict)

    @property
    def n_seqs(self) -> int:
        return int(self.pair.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.pair.clean.shape[1])


# ---------------------------------------------------------------- induction


def induction_task(
    model: HookedTransformer, *, n_tokens: int = 10, n_seqs: int = 4, n_mean: int = 8, prefix: int = 1, seed: int = 0
) -> CircuitTask:
    """Repeated random tokens (see the module docstring); the mean set is ``n_mean`` sequences of another seed."""
    seed = check_count("seed", seed, minimum=0)
    n_tokens = check_count("n_tokens", n_tokens, minimum=3)
    n_seqs = check_count("n_seqs", n_seqs)
    n_mean = check_count("n_mean", n_mean)
    prefix = check_count("prefix", prefix, minimum=0)
    pair = induction_pair(model, n_tokens=n_tokens, n_seqs=n_seqs, prefix=prefix, seed=seed)
    means = induction_pair(model, n_tokens=n_tokens, n_seqs=n_mean, prefix=prefix, seed=seed + 10_000).clean
    info = dict(pair.info, task="induction", n_seqs=n_seqs, n_mean=n_mean, mean_seed=seed + 10_000)
    return CircuitTask("induction", pair, means, info)


# ---------------------------------------------------------------- IOI


def one_token_words(model: HookedTransformer, words, *, what: str, need: int) -> list[str]:
    """The ``words`` that are ONE token with a leading space for ``model``'s tokenizer (at least ``need`` of them)."""
    check_model(model)
    if model.tokenizer is None:
        raise HeadlensError(f"the {what} of a text task need a model with a tokenizer (the toy model has none)")
    ok = [w for w in words if len(model.to_tokens(" " + w, prepend_bos=False)[0]) == 1]
    if len(ok) < need:
        raise HeadlensError(
            f"only {len(ok)} of the built-in {what} are one token with a leading space for this tokenizer "
            f"(need {need}): this task needs a model with a word-level vocabulary such as Qwen's"
        )
    return ok


def ioi_prompts(
    model: HookedTransformer, n_seqs: int, *, seed: int = 0, templates=IOI_TEMPLATES
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(clean texts, corrupted texts, IO names, S names): ``n_seqs`` IOI prompts, alternately ABBA and BABA, templates
    in turn, names/places/objects drawn with ``seed``; corrupted = the same sentence with three other names."""
    check_model(model)
    if n_seqs < 2:
        raise HeadlensError(f"an IOI task needs at least 2 prompts (one ABBA, one BABA), got {n_seqs}")
    names = one_token_words(model, IOI_NAMES, what="names", need=5)
    places = one_token_words(model, IOI_PLACES, what="places", need=1)
    objects = one_token_words(model, IOI_OBJECTS, what="objects", need=1)
    g = torch.Generator().manual_seed(int(seed))
    clean, corrupted, ios, ss = [], [], [], []
    for i in range(n_seqs):
        template = templates[(i // 2) % len(templates)]
        pick = [names[j] for j in torch.randperm(len(names), generator=g)[:5].tolist()]
        io, s, c, d, e = pick
        place = places[int(torch.randint(len(places), (), generator=g))]
        obj = objects[int(torch.randint(len(objects), (), generator=g))]
        a, b = (io, s) if i % 2 == 0 else (s, io)  # ABBA, then BABA
        clean.append(template.format(A=a, B=b, S=s, PLACE=place, OBJECT=obj))
        corrupted.append(template.format(A=c, B=d, S=e, PLACE=place, OBJECT=obj))
        ios.append(" " + io)
        ss.append(" " + s)
    return clean, corrupted, ios, ss


def _texts_tokens(model: HookedTransformer, texts: list[str], what: str) -> Int[Tensor, "n pos"]:
    rows = [model.to_tokens(t, prepend_bos=model.cfg.default_prepend_bos)[0] for t in texts]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise HeadlensError(
            f"the {what} prompts tokenize to different lengths {lengths} for this tokenizer; every prompt of a batch "
            "must have the same length (choose templates of equal token count)"
        )
    return torch.stack(rows).to(model.cfg.device)


def _ids(model: HookedTransformer, words: list[str]) -> Int[Tensor, "n 1"]:
    return torch.tensor([[int(model.to_tokens(w, prepend_bos=False)[0, 0])] for w in words])


def ioi_task(
    model: HookedTransformer, *, n_seqs: int = 8, n_mean: int = 16, seed: int = 0, templates=IOI_TEMPLATES
) -> CircuitTask:
    """IOI prompts (see the module docstring); the mean set is ``n_mean`` IOI prompts of another seed."""
    check_model(model)
    n_seqs = check_count("n_seqs", n_seqs)
    n_mean = check_count("n_mean", n_mean)
    seed = check_count("seed", seed, minimum=0)
    clean, corrupted, ios, ss = ioi_prompts(model, n_seqs, seed=seed, templates=templates)
    mean_texts = ioi_prompts(model, n_mean, seed=seed + 10_000, templates=templates)[0]
    clean_t = _texts_tokens(model, clean, "IOI")
    corrupted_t = _texts_tokens(model, corrupted, "corrupted IOI")
    mean_t = _texts_tokens(model, mean_texts, "IOI mean-set")
    if mean_t.shape[1] != clean_t.shape[1]:
        raise HeadlensError("the IOI mean-set prompts have another length than the task's: use templates of one length")
    correct, wrong = _ids(model, ios), _ids(model, ss)
    positions = torch.tensor([clean_t.shape[1] - 1])
    metric = partial(logit_diff, correct=correct, wrong=wrong)
    pair = PromptPair(clean_t, corrupted_t, positions, metric, name="ioi", info={"metric": "logit(IO) - logit(S)"})
    info = {
        "task": "ioi",
        "n_seqs": n_seqs,
        "n_mean": n_mean,
        "seed": seed,
        "mean_seed": seed + 10_000,
        "templates": list(templates),
        "examples": clean[:2],
        "corrupted_examples": corrupted[:2],
        "metric": "logit(IO) - logit(S) at the last position",
        "io": [w.strip() for w in ios],
        "s": [w.strip() for w in ss],
    }
    return CircuitTask("ioi", pair, mean_t, info)


def ioi_positions(model: HookedTransformer, task: CircuitTask) -> dict[str, Int[Tensor, " n_seqs"]]:
    """Per prompt, the positions of the IO name, the first and second S, and END (the last position)."""
    check_model(model)
    tokens = task.pair.clean
    io, s = _ids(model, [" " + w for w in task.info["io"]])[:, 0], _ids(model, [" " + w for w in task.info["s"]])[:, 0]
    io_pos = (tokens == io.to(tokens.device)[:, None]).float().argmax(1)
    s_hits = tokens == s.to(tokens.device)[:, None]
    s1 = s_hits.float().argmax(1)
    s2 = tokens.shape[1] - 1 - s_hits.flip(1).float().argmax(1)
    end = torch.full_like(io_pos, tokens.shape[1] - 1)
    return {"IO": io_pos.cpu(), "S1": s1.cpu(), "S2": s2.cpu(), "END": end.cpu()}


# ---------------------------------------------------------------- brackets


def _swapped(tokenizer, token_id: int, old: str, new: str) -> int | None:
    """The id of ``token_id``'s text with its first ``old`` bracket replaced by ``new``, when that is one token."""
    text = tokenizer.decode([token_id])
    if old not in text:
        return None
    ids = tokenizer.encode(text.replace(old, new, 1), add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def bracket_examples(model: HookedTransformer, *, n: int, seq_len: int, seed: int) -> list[tuple]:
    """``n`` examples (seeded draw) of (window tokens ending at the token before a closer, opener position in the
    window, right closer id, other closer id, other opener id) from the standard library.

    A closer is a token that starts with ``)`` or ``]`` (``)``, ``):``, ``))`` ...: most closers share their token),
    its opener a token holding the matching ``(`` or ``[`` (Python's own tokenizer pairs them, so brackets in strings
    and comments do not count) at least ``MIN_GAP`` tokens back and inside the window. The other closer / opener is
    the same token with the other bracket, kept only where that is one token too.
    """
    check_model(model)

    tokenizer = model.tokenizer
    if tokenizer is None:
        raise HeadlensError("the brackets task needs a model with a tokenizer (the toy model has none)")
    other = {"(": "[", "[": "(", ")": "]", "]": ")"}
    found = []
    for name, text in stdlib_sources(BRACKET_FILES).items():
        ids, _, closers, *_ = _file_arrays(tokenizer, text)
        for c, (o, _, _) in sorted(closers.items()):
            start = c + 1 - seq_len
            if start < 0 or o < start:
                continue
            closer_text = tokenizer.decode([ids[c + 1]]).lstrip()
            opener_text = tokenizer.decode([ids[o]])
            if not closer_text or closer_text[0] not in ")]":
                continue
            bracket = closer_text[0]
            open_char = "(" if bracket == ")" else "["
            wrong = _swapped(tokenizer, ids[c + 1], bracket, other[bracket])
            swap = _swapped(tokenizer, ids[o], open_char, other[open_char])
            if wrong is None or swap is None or open_char not in opener_text:
                continue
            found.append((name, c, torch.tensor(ids[start : c + 1]), o - start, int(ids[c + 1]), wrong, swap))
    if len(found) < n:
        raise HeadlensError(
            f"only {len(found)} stdlib windows of {seq_len} tokens end before a closing bracket whose opener is inside "
            f"them; ask for fewer prompts (n_seqs + n_mean <= {len(found)})"
        )
    order = torch.randperm(len(found), generator=torch.Generator().manual_seed(int(seed)))[:n].tolist()
    return [found[i][2:] for i in order]


def brackets_task(
    model: HookedTransformer, *, n_seqs: int = 8, n_mean: int = 8, seq_len: int = 24, seed: int = 0
) -> CircuitTask:
    """Stdlib code that must close a bracket (see the module docstring); the mean set is other such windows."""
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    n_seqs = check_count("n_seqs", n_seqs)
    n_mean = check_count("n_mean", n_mean)
    seq_len = check_count("seq_len", seq_len, minimum=8)
    examples = bracket_examples(model, n=n_seqs + n_mean, seq_len=seq_len, seed=seed)
    task, means = examples[:n_seqs], examples[n_seqs:]
    clean = torch.stack([t for t, *_ in task])
    corrupted = clean.clone()
    for i, (_, o, _, _, other_opener) in enumerate(task):
        corrupted[i, o] = other_opener
    correct = torch.tensor([[right] for _, _, right, _, _ in task])
    wrong = torch.tensor([[other] for _, _, _, other, _ in task])
    positions = torch.tensor([seq_len - 1])
    metric = partial(logit_diff, correct=correct, wrong=wrong)
    device = model.cfg.device
    pair = PromptPair(clean.to(device), corrupted.to(device), positions, metric, name="brackets")
    info = {
        "task": "brackets",
        "n_seqs": n_seqs,
        "n_mean": n_mean,
        "seq_len": seq_len,
        "seed": seed,
        "metric": "logit(right closer) - logit(other closer) at the last position",
        "correct": correct[:, 0].tolist(),
        "wrong": wrong[:, 0].tolist(),
    }
    return CircuitTask("brackets", pair, torch.stack([t for t, *_ in means]).to(device), info)


# ---------------------------------------------------------------- user pair


def pair_task(
    model: HookedTransformer, clean, corrupted, *, correct=None, wrong=None, name: str = "pair"
) -> CircuitTask:
    """A user pair (texts of equal token length; answers as in :func:`headlens.interventions.patching.text_pair`); no mean set."""
    pair = text_pair(model, clean, corrupted, answer=correct, wrong=wrong)
    return CircuitTask(name, pair, None, dict(pair.info, task=name))


def build_task(
    model: HookedTransformer, name: str, *, n_seqs: int | None = None, seed: int = 0, **kwargs
) -> CircuitTask:
    """A built-in task by name (``induction``, ``ioi``, ``brackets``) with its default sizes unless given."""
    check_model(model)
    if name not in TASKS:
        raise HeadlensError(f"unknown task {name!r}: choose one of {', '.join(TASKS)} (or give a clean/corrupted pair)")
    builder = {"induction": induction_task, "ioi": ioi_task, "brackets": brackets_task}[name]
    if n_seqs is not None:
        kwargs["n_seqs"] = n_seqs
    return builder(model, seed=seed, **kwargs)
