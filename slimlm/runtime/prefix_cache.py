"""A cross-request cache of prompt KV: the longest cached prefix of a token sequence, kept under a byte budget.

Causal attention makes a token's keys and values depend only on the tokens up to it, so the KV computed
for a sequence ``s`` serves any later query ``q`` that starts the same way: with ``m = lcp(q, s)`` (the
length of their longest common prefix), ``K_s[..., :m, :]`` and ``V_s[..., :m, :]`` are exactly the KV of
``q[:m]``, and only ``q[m:]`` has to run.

Storage is a radix tree over token ids (the structure of SGLang's RadixAttention). Each node holds an edge
of tokens and the KV of exactly those tokens, per layer a (keys, values) pair of shape
``[1, H_kv, len(edge), D]``; the KV of a stored sequence is its path's KV concatenated along the sequence.
Sequences that share a prefix share its nodes, so one user profile or system prompt is stored once however
many candidates or questions follow it.

- :meth:`PrefixCache.lookup`: walk down while tokens match; the match may end inside an edge (its KV is
  then sliced). Returns ``m`` and the KV of ``q[:m]``.
- :meth:`PrefixCache.insert`: walk the matching part, split the edge where the new sequence leaves it, and
  hang the rest below with the matching columns of its KV, cloned so that the cache holds exactly the bytes
  it counts (a view would keep the caller's whole batch tensor alive).
- Budget: ``bytes = Σ_nodes Σ_layers (numel(K) + numel(V)) × element size``. After an insert the least
  recently used *leaf* is evicted until ``bytes <= max_bytes``. Every lookup and insert marks each node on
  its path as used, so a node is always at least as recent as its children and evicting leaves first is
  LRU over whole prefixes: a shared prefix goes only after everything below it has gone.

Stored tensors are never written to. A user builds a fresh cache object from them for each forward, and
transformers' ``DynamicCache`` grows by concatenation (new tensors), so the stored ones stay as they were;
the decode batch copies a prompt's KV into its own preallocated buffers (``runtime/kv_cache.py``).

Compute once: a caller about to compute a sequence's KV may *claim* it (``lookup(..., claim=True)``).
Until it inserts (or releases), a lookup whose tokens are a prefix of the claimed ones, or extend them, and
that would reuse more from the claim than from the cache, gets ``pending`` (an Event set when the claim
resolves) instead of a miss. The cache itself never blocks: a thread waits on the event, a scheduler step
tries again later; either way the second request for a prefix reuses the first one's work.

Thread-safe: one lock around the tree; KV concatenation for a lookup runs outside it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slimlm import SlimlmError

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, H_kv, T, D]


def kv_len(kv: KV | None) -> int:
    """Tokens T covered by ``kv`` (0 for None)."""
    return 0 if not kv else kv[0][0].shape[-2]


def kv_nbytes(kv: KV) -> int:
    """Bytes held by the keys and values of every layer."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def _cols(kv: KV, start: int, stop: int | None = None) -> KV:
    return [(k[:, :, start:stop], v[:, :, start:stop]) for k, v in kv]


def _clone(kv: KV) -> KV:
    return [(k.clone(), v.clone()) for k, v in kv]


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token tuples."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case (a whole edge matches) in one C-level comparison
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


class _Node:
    __slots__ = ("tokens", "kv", "children", "parent", "last_used", "nbytes")

    def __init__(self, tokens: tuple[int, ...], kv: KV | None, parent: _Node | None, last_used: int):
        self.tokens, self.kv, self.parent, self.last_used = tokens, kv, parent, last_used
        self.children: dict[int, _Node] = {}
        self.nbytes = kv_nbytes(kv) if kv else 0


@dataclass(eq=False)
class Claim:
    """A caller's promise to compute the KV of ``tokens`` and then :meth:`PrefixCache.insert` (or
    :meth:`PrefixCache.release`) it; ``done`` is set when it does."""

    tokens: tuple[int, ...]
    done: threading.Event


@dataclass
class Lookup:
    """What :meth:`PrefixCache.lookup` found.

    ``length`` tokens of the query are covered by ``kv`` (per layer [1, H_kv, length, D]; None on a miss).
    ``claim``: the caller now owns the computation of the query's KV and must insert or release it.
    ``pending``: another caller is computing more of this query than the cache holds; wait on the event
    (or retry later) and look up again. ``length`` and ``kv`` are empty then.
    """

    length: int = 0
    kv: KV | None = None
    claim: Claim | None = None
    pending: threading.Event | None = None


class PrefixCache:
    """Prompt KV shared across requests: longest-prefix lookup, LRU eviction under ``max_bytes``.

    ``min_tokens``: a match shorter than this counts as a miss and returns nothing (every prompt of a model
    whose tokenizer adds BOS shares its first token; reusing a handful of tokens is not worth a hit, nor
    waiting on another caller's claim). See the module docstring for the structure and guarantees.
    """

    def __init__(self, max_bytes: int, *, min_tokens: int = 1):
        if max_bytes < 0:
            raise SlimlmError(f"prefix cache budget must be >= 0 bytes, got {max_bytes}")
        if min_tokens < 1:
            raise SlimlmError(f"min_tokens must be >= 1, got {min_tokens}")
        self.max_bytes, self.min_tokens = int(max_bytes), min_tokens
        self._lock = threading.Lock()
        self._root = _Node((), None, None, 0)
        self._nodes: set[_Node] = set()
        self._claims: list[Claim] = []
        self._clock = 0
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.reused_tokens = self.stored_tokens = 0

    # ------------------------------------------------------------------ reading

    def _match(self, tokens: tuple[int, ...], cap: int) -> tuple[int, list[tuple[_Node, int]]]:
        """(m, path): ``tokens[:m]`` (m <= cap) is spelled by ``path``, a list of (node, columns used)."""
        node, i, path = self._root, 0, []
        while i < cap:
            child = node.children.get(tokens[i])
            if child is None:
                break
            j = _lcp(child.tokens, tokens[i:cap])
            path.append((child, j))
            i += j
            if j < len(child.tokens):
                break
            node = child
        return i, path

    def lookup(self, tokens: Sequence[int], *, limit: int | None = None, claim: bool = False) -> Lookup:
        """The KV of the longest cached prefix of ``tokens``, at most ``limit`` tokens long.

        With ``claim``, a caller that will compute the rest claims ``tokens`` (unless the cache already
        covers all of them): it must then :meth:`insert` or :meth:`release`. A claim that another caller
        holds on a longer overlapping sequence makes the result ``pending`` instead."""
        tokens = tuple(tokens)
        cap = len(tokens) if limit is None else max(0, min(limit, len(tokens)))
        with self._lock:
            m, path = self._match(tokens, cap)
            if m < self.min_tokens:
                m, path = 0, []
            for c in self._claims:
                overlap = _lcp(c.tokens, tokens)
                usable = min(overlap, cap)
                if overlap == min(len(c.tokens), len(tokens)) and usable > m and usable >= self.min_tokens:
                    return Lookup(pending=c.done)
            self._clock += 1
            for node, _ in path:
                node.last_used = self._clock
            if m:
                self.hits += 1
                self.reused_tokens += m
            else:
                self.misses += 1
            new = None
            if claim and m < len(tokens):
                new = Claim(tokens, threading.Event())
                self._claims.append(new)
            parts = [(node.kv, j) for node, j in path]
        if not parts:
            return Lookup(0, None, new)
        if len(parts) == 1:  # views of the stored tensors: nothing copies them, eviction only drops a reference
            kv = _cols(parts[0][0], 0, parts[0][1])
        else:
            kv = [(torch.cat([p[layer][0][:, :, :j] for p, j in parts], dim=2),
                   torch.cat([p[layer][1][:, :, :j] for p, j in parts], dim=2)) for layer in range(len(parts[0][0]))]
        return Lookup(m, kv, new)

    # ------------------------------------------------------------------ writing

    def insert(self, tokens: Sequence[int], kv: KV, *, claim: Claim | None = None) -> int:
        """Store the KV of ``tokens`` (per layer [1, H_kv, len(tokens), D]); resolve ``claim``.

        Only the part beyond what the tree already holds is copied. Returns the number of tokens newly
        stored (0 when all were there, or when the new part alone is over the budget)."""
        tokens = tuple(tokens)
        try:
            if kv_len(kv) != len(tokens) or any(k.shape[0] != 1 for k, _ in kv):
                raise SlimlmError(f"prefix cache insert: KV covers {kv_len(kv)} tokens of batch "
                                  f"{kv[0][0].shape[0] if kv else 0}; expected {len(tokens)} tokens of batch 1")
            with self._lock:
                return self._insert(tokens, kv)
        finally:
            if claim is not None:
                self.release(claim)

    def _insert(self, tokens: tuple[int, ...], kv: KV) -> int:
        if not tokens or self.max_bytes == 0:
            return 0
        self._clock += 1
        node, i = self._root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            j = _lcp(child.tokens, tokens[i:])
            if j < len(child.tokens):
                child = self._split(child, j)
            child.last_used = self._clock
            node, i = child, i + j
        if i == len(tokens):
            return 0
        rest = _cols(kv, i)
        if kv_nbytes(rest) > self.max_bytes:  # would evict everything and then itself
            return 0
        leaf = _Node(tokens[i:], _clone(rest), node, self._clock)
        node.children[tokens[i]] = leaf
        self._nodes.add(leaf)
        self.bytes += leaf.nbytes
        self.stored_tokens += len(leaf.tokens)
        self._evict()
        return len(tokens) - i

    def _split(self, node: _Node, j: int) -> _Node:
        """Cut ``node``'s edge after ``j`` tokens; return the new upper node (which has ``node`` as its child).

        Both halves are cloned so that each owns its bytes (views would pin the whole original tensor)."""
        upper = _Node(node.tokens[:j], _clone(_cols(node.kv, 0, j)), node.parent, node.last_used)
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.kv, node.parent = node.tokens[j:], _clone(_cols(node.kv, j)), upper
        self.bytes -= node.nbytes
        node.nbytes = kv_nbytes(node.kv)
        self.bytes += node.nbytes + upper.nbytes
        upper.children[node.tokens[0]] = node
        self._nodes.add(upper)
        return upper

    def _evict(self) -> None:
        # a linear scan for the oldest leaf: the tree holds hundreds to thousands of nodes, and this runs
        # only when an insert goes over the budget
        while self.bytes > self.max_bytes and self._nodes:
            leaf = min((n for n in self._nodes if not n.children), key=lambda n: n.last_used)
            del leaf.parent.children[leaf.tokens[0]]
            self._nodes.discard(leaf)
            self.bytes -= leaf.nbytes
            self.stored_tokens -= len(leaf.tokens)
            self.evictions += 1

    def release(self, claim: Claim) -> None:
        """Give up ``claim`` (its computation failed or was cancelled); whoever waits on it looks up again."""
        with self._lock:
            if claim in self._claims:
                self._claims.remove(claim)
        claim.done.set()

    def clear(self) -> None:
        """Drop every stored sequence (claims stay with their owners; counters are kept)."""
        with self._lock:
            self._root.children.clear()
            self._nodes.clear()
            self.bytes = self.stored_tokens = 0

    def stats(self) -> dict[str, int]:
        """Counters (hits, misses, evictions, reused tokens) and sizes (bytes, nodes, stored tokens)."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "reused_tokens": self.reused_tokens, "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "nodes": len(self._nodes), "stored_tokens": self.stored_tokens, "claims": len(self._claims)}
