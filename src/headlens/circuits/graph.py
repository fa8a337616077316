"""The computational graph circuits are made of: nodes (embed, every head, every MLP, logits) and edges (a sender's
output into a receiver's q, k, v or MLP input, or into the logits).

A transformer's residual stream is a sum: the input to any component is the embedding plus the outputs of all earlier
heads and MLPs (plus constant biases). An *edge* ``s -> r[i]`` is one term of that sum as read by receiver ``r``
through input ``i``; corrupting it changes what ``r`` reads and nothing else (everything downstream of ``r`` is then
recomputed). Nodes and inputs (TransformerLens hook names in brackets):

- senders, in the order the residual stream receives them: ``embed`` (``blocks.0.hook_resid_pre``: token and, for
  models that have one, learned position embedding), then per layer its heads (``L{l}H{h}``: the head's ``z @ W_O``,
  without ``b_O``, which is constant) and its MLP (``MLP{l}``, ``blocks.{l}.hook_mlp_out``; absent in attention-only
  models);
- receiver inputs ("slots"), in forward order: per layer the q inputs of its heads, their k inputs, their v inputs
  (``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` with ``use_split_qkv_input``), the MLP input
  (``hook_mlp_in``); last the ``logits`` (the final residual stream, before the final norm).

GQA (Qwen2.5-0.5B: 14 q heads share 2 kv heads). k/v edges are keyed per **q head**: the model runs with
``ungroup_grouped_query_attention`` (each q head gets its own copy of its kv head's keys and values, computed with the
kv head's ``W_K``/``W_V``; same logits), so ``s -> L9H8[k]`` changes the keys that L9H8 alone reads; its kv-group
siblings keep the clean keys. Keying per kv head instead would make one edge move seven heads at once and mix their
effects; the per-q-head edge answers "does this head need this sender in its keys?", and a kv group's edge is the
set of its q heads' edges.

Edge ``s -> r`` exists when ``s`` writes before ``r`` reads: heads of layer ``l`` read from the embedding and every
head and MLP of layers ``< l``; the MLP of layer ``l`` also reads the heads of layer ``l``; the logits read all.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.errors import HeadlensError, check_model
from headlens.heads import Head, head_name, parse_head

INPUTS = ("q", "k", "v", "mlp", "logits")
EMBED, LOGITS = "embed", "logits"


def mlp_name(layer: int) -> str:
    """``MLP5``: the one spelling of an MLP node."""
    return f"MLP{int(layer)}"


@dataclass(frozen=True)
class Slot:
    """One receiver input: ``node`` read through ``input`` (q, k, v, mlp or logits) at ``layer`` (n_layers: logits)."""

    node: str
    input: str
    layer: int
    head: int | None = None


@dataclass(frozen=True)
class Graph:
    """Senders, receiver slots and the valid-edge mask of a model's graph (see the module docstring)."""

    n_layers: int
    n_heads: int
    has_mlp: bool

    @classmethod
    def of(cls, model: HookedTransformer) -> Graph:
        """The graph of ``model`` (checked first: the circuits functions that start here need no check of their own)."""
        cfg = check_model(model).cfg
        if cfg.parallel_attn_mlp or cfg.use_normalization_before_and_after:
            raise HeadlensError(
                "circuits need a sequential pre-norm model (attention, then MLP, each read from the residual)"
            )
        return cls(cfg.n_layers, cfg.n_heads, not cfg.attn_only)

    # ---------------------------------------------------------------- senders

    @cached_property
    def senders(self) -> tuple[str, ...]:
        names = [EMBED]
        for layer in range(self.n_layers):
            names += [head_name(layer, h) for h in range(self.n_heads)]
            if self.has_mlp:
                names.append(mlp_name(layer))
        return tuple(names)

    @cached_property
    def sender_layer(self) -> np.ndarray:
        """The layer each sender writes in (embed: -1)."""
        return np.array([_node_layer(n) for n in self.senders])

    @cached_property
    def sender_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.senders)}

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * self.per_layer + head

    def mlp_sender(self, layer: int) -> int:
        if not self.has_mlp:
            raise HeadlensError("this model has no MLPs (attention-only)")
        return 1 + layer * self.per_layer + self.n_heads

    @property
    def per_layer(self) -> int:
        return self.n_heads + int(self.has_mlp)

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    def senders_before(self, slot: Slot) -> int:
        """How many senders (a prefix of :attr:`senders`) write before ``slot`` reads."""
        if slot.input == LOGITS:
            return self.n_senders
        start = 1 + slot.layer * self.per_layer
        return start + self.n_heads if slot.input == "mlp" else start

    # ---------------------------------------------------------------- receivers

    @cached_property
    def slots(self) -> tuple[Slot, ...]:
        out = []
        for layer in range(self.n_layers):
            for kind in ("q", "k", "v"):
                out += [Slot(head_name(layer, h), kind, layer, h) for h in range(self.n_heads)]
            if self.has_mlp:
                out.append(Slot(mlp_name(layer), "mlp", layer))
        out.append(Slot(LOGITS, LOGITS, self.n_layers))
        return tuple(out)

    @cached_property
    def slot_index(self) -> dict[tuple[str, str], int]:
        return {(s.node, s.input): i for i, s in enumerate(self.slots)}

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def layer_slots(self, layer: int, kind: str) -> slice:
        """The slots of ``kind`` (q, k, v, mlp) at ``layer``, a contiguous range; logits: the last slot."""
        if kind == LOGITS:
            return slice(self.n_slots - 1, self.n_slots)
        base = layer * (3 * self.n_heads + int(self.has_mlp))
        if kind == "mlp":
            return slice(base + 3 * self.n_heads, base + 3 * self.n_heads + 1)
        i = "qkv".index(kind)
        return slice(base + i * self.n_heads, base + (i + 1) * self.n_heads)

    # ---------------------------------------------------------------- edges

    @cached_property
    def valid(self) -> Bool[Tensor, "sender slot"]:
        """``valid[s, r]``: sender ``s`` writes before slot ``r`` reads (an edge of the graph)."""
        mask = torch.zeros(self.n_senders, self.n_slots, dtype=torch.bool)
        for r, slot in enumerate(self.slots):
            mask[: self.senders_before(slot), r] = True
        return mask

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def edge_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(sender, slot) index arrays of every edge, in slot-major order (receivers in forward order)."""
        r, s = torch.nonzero(self.valid.T, as_tuple=True)
        return s.numpy(), r.numpy()

    def edge(self, sender: str, receiver: str, input: str) -> tuple[int, int]:
        """(sender index, slot index) of an edge by names, e.g. ``("L0H2", "L1H2", "k")``; a clear error otherwise."""
        sender, receiver = _canonical(sender), _canonical(receiver)
        if sender not in self.sender_index:
            raise HeadlensError(f"{sender!r} is not a sender of this graph (embed, L{{l}}H{{h}} or MLP{{l}})")
        key = (receiver, input)
        if key not in self.slot_index:
            raise HeadlensError(f"{receiver}[{input}] is not a receiver input of this graph")
        s, r = self.sender_index[sender], self.slot_index[key]
        if not bool(self.valid[s, r]):
            raise HeadlensError(f"{sender} does not write before {receiver}[{input}] reads: no such edge")
        return s, r

    def check_edges(self, senders, slots) -> tuple[np.ndarray, np.ndarray]:
        """(sender, slot) index arrays as int arrays when they name edges of this graph; a clear error otherwise
        (a negative index would read from the end: -1 is the logits slot or the last MLP)."""
        s, r = np.asarray(senders), np.asarray(slots)
        for what, idx, n in (("sender", s, self.n_senders), ("slot", r, self.n_slots)):
            if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
                raise HeadlensError(f"{what} indices must be a 1-d array of integers, got {idx.tolist()!r}")
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise HeadlensError(
                    f"{what} index {int(idx.min() if idx.min() < 0 else idx.max())} is not in 0..{n - 1}"
                )
        if len(s) != len(r):
            raise HeadlensError(f"give one slot per sender: {len(s)} senders, {len(r)} slots")
        bad = np.nonzero(
            ~self.valid[torch.as_tensor(s, dtype=torch.long), torch.as_tensor(r, dtype=torch.long)].numpy()
        )[0]
        if len(bad):
            i = int(bad[0])
            slot = self.slots[int(r[i])]
            raise HeadlensError(
                f"{self.senders[int(s[i])]} does not write before {slot.node}[{slot.input}] reads: no such edge"
            )
        return s.astype(int), r.astype(int)

    def check_scores(self, scores, what: str = "scores") -> Tensor:
        """``scores`` when it is a ``[sender, slot]`` tensor of this graph (e.g. another model's would misplace edges)."""
        shape = (self.n_senders, self.n_slots)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != shape:
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise HeadlensError(f"{what} must be a [sender, slot] tensor of shape {shape} for this model, got {got}")
        return scores

    def edge_frame(self, scores: dict[str, Tensor] | None = None) -> pd.DataFrame:
        """One row per edge: ``sender, receiver, input, sender_layer, receiver_layer`` and a column per score matrix
        (``[sender, slot]`` tensors, e.g. ``{"eap": ..., "eap_ig": ...}``)."""
        s, r = self.edge_index()
        df = pd.DataFrame(
            {
                "sender": [self.senders[i] for i in s],
                "receiver": [self.slots[j].node for j in r],
                "input": [self.slots[j].input for j in r],
                "sender_layer": self.sender_layer[s],
                "receiver_layer": [self.slots[j].layer for j in r],
            }
        )
        for name, matrix in (scores or {}).items():
            df[name] = matrix[torch.as_tensor(s), torch.as_tensor(r)].double().numpy()
        return df


def _node_layer(name: str) -> int:
    if name == EMBED:
        return -1
    if name.startswith("MLP"):
        return int(name[3:])
    return parse_head(name).layer


def _canonical(name: str) -> str:
    """``embed``, ``logits``, ``MLP3`` or a head in any spelling parse_head takes, as the graph names it."""
    if isinstance(name, str) and (name in (EMBED, LOGITS) or name.upper().startswith("MLP")):
        return name if name in (EMBED, LOGITS) else mlp_name(int(name[3:]))
    return str(parse_head(name))


def node_kind(name: str) -> str:
    """``embed``, ``head``, ``mlp`` or ``logits``."""
    if name in (EMBED, LOGITS):
        return name
    return "mlp" if name.startswith("MLP") else "head"


def node_head(name: str) -> Head | None:
    return parse_head(name) if node_kind(name) == "head" else None
