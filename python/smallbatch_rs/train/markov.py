"""A synthetic language whose best possible loss is known: ``--data markov:...``.

A seeded first-order Markov chain over ``vocab`` tokens. Each token has ``branch`` successors
(a random subset of the vocabulary) with Zipf-like probabilities: the ``k``-th most likely
successor of token ``i`` has probability proportional to ``(k + 1) ** -s_i``, where the exponent
``s_i = zipf * u_i`` with ``u_i`` uniform in ``[0.5, 1.5)`` differs from token to token, so that
contexts differ in how predictable they are.

Every sequence starts from the chain's stationary distribution ``pi`` (computed by power
iteration to float64 precision), so every position of every sequence has marginal ``pi`` and
the expected cross-entropy of the best possible predictor, the true transition probabilities,
is the chain's entropy rate

    H = sum_i pi_i * H_i,    H_i = -sum_k p_ik log p_ik    (nats per token),

which this module computes exactly from the transition table: a loss reads as "nats above the
floor". A model that learns the table reaches it; the gap measures how well an optimizer learns.

The token stream is generated in float64 arithmetic from ``numpy.random.default_rng(seed)``
(deterministic across machines), as sequences of ``seq_len + 1`` tokens laid back to back, and
cached under the package's cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Dict, List, Tuple

import numpy as np

PREFIX = "markov:"
#: Power iteration stops when an iteration moves pi by less than this (L1).
STATIONARY_TOLERANCE = 1e-14
STATIONARY_MAX_ITERATIONS = 100_000


@dataclasses.dataclass(frozen=True)
class MarkovSpec:
    """What ``--data markov:vocab=2048,branch=64,zipf=1.2,seed=0,tokens=8M`` asks for."""

    vocab: int = 2048
    branch: int = 64
    zipf: float = 1.2
    seed: int = 0
    tokens: int = 1 << 23

    @classmethod
    def parse(cls, source: str) -> "MarkovSpec":
        """The spec of a ``--data`` value ``markov:`` followed by comma-separated ``key=value``
        settings (any subset, in any order; ``markov:`` alone takes the defaults). Raises
        ValueError naming the bad setting."""
        if not source.startswith(PREFIX):
            raise ValueError(f"--data {source!r} is not a markov: source")
        settings: Dict[str, object] = {}
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        body = source[len(PREFIX):].strip()
        for item in filter(None, (part.strip() for part in body.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in fields:
                known = ", ".join(fields)
                raise ValueError(f"--data {source!r}: unknown setting {item!r} (settings: {known}, as key=value)")
            try:
                settings[key] = _number(value.strip(), integer=key != "zipf")
            except ValueError:
                raise ValueError(f"--data {source!r}: {key} must be a number, got {value.strip()!r}") from None
        spec = cls(**settings)  # type: ignore[arg-type]
        spec.check(source)
        return spec

    def check(self, source: str = "markov") -> None:
        if not 2 <= self.vocab <= 1 << 16:
            raise ValueError(f"--data {source!r}: vocab must be in [2, 65536], got {self.vocab}")
        if not 1 <= self.branch <= self.vocab:
            raise ValueError(f"--data {source!r}: branch must be in [1, vocab], got {self.branch}")
        if not (np.isfinite(self.zipf) and self.zipf >= 0):
            raise ValueError(f"--data {source!r}: zipf must be finite and >= 0, got {self.zipf}")
        if self.tokens < 2:
            raise ValueError(f"--data {source!r}: tokens must be >= 2, got {self.tokens}")
        if self.seed < 0:
            raise ValueError(f"--data {source!r}: seed must be >= 0, got {self.seed}")

    @property
    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _number(text: str, integer: bool) -> float:
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}
    if text and text[-1].lower() in scale:
        value = float(text[:-1]) * scale[text[-1].lower()]
    else:
        value = float(text)
    if integer:
        if value != int(value):
            raise ValueError(text)
        return int(value)
    return value


class MarkovChain:
    """The chain of a :class:`MarkovSpec`: successor table, transition probabilities, stationary
    distribution and entropy rate."""

    def __init__(self, spec: MarkovSpec):
        spec.check()
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        v, k = spec.vocab, spec.branch
        # Each token's successors: `branch` distinct tokens, most likely first.
        self.successors = np.stack([rng.choice(v, size=k, replace=False) for _ in range(v)]).astype(np.int64)
        exponents = spec.zipf * (0.5 + rng.random(v))
        weights = np.arange(1, k + 1, dtype=np.float64)[None, :] ** -exponents[:, None]
        self.probs = weights / weights.sum(axis=1, keepdims=True)
        self.cumulative = np.cumsum(self.probs, axis=1)
        self.cumulative[:, -1] = 1.0
        self.stationary = self._stationary()
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(self.probs > 0, self.probs * np.log(self.probs), 0.0).sum(axis=1)
        self.token_entropy = h
        #: Nats per token of the best possible predictor: the loss floor.
        self.entropy_rate = float(np.dot(self.stationary, h))

    def _stationary(self) -> np.ndarray:
        v = self.spec.vocab
        pi = np.full(v, 1.0 / v)
        flat = self.successors.ravel()
        for _ in range(STATIONARY_MAX_ITERATIONS):
            # Half a step of laziness (pi <- (pi + pi P) / 2) keeps the same fixed point and
            # converges even where the chain is periodic.
            moved = np.bincount(flat, weights=(pi[:, None] * self.probs).ravel(), minlength=v)
            new = 0.5 * (pi + moved)
            new /= new.sum()
            if np.abs(new - pi).sum() < STATIONARY_TOLERANCE:
                return new
            pi = new
        raise ValueError(
            f"markov chain {self.spec}: the stationary distribution did not converge in "
            f"{STATIONARY_MAX_ITERATIONS} iterations (the chain may not be irreducible: raise branch)"
        )

    def sample(self, sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``sequences`` independent sequences of ``length`` tokens, each starting from the
        stationary distribution: ``[sequences, length]`` int64."""
        out = np.empty((sequences, length), dtype=np.int64)
        state = np.searchsorted(np.cumsum(self.stationary), rng.random(sequences) * self.stationary.sum(), side="right")
        state = np.minimum(state, self.spec.vocab - 1)
        out[:, 0] = state
        for t in range(1, length):
            u = rng.random(sequences)
            choice = (self.cumulative[state] <= u[:, None]).sum(axis=1)
            state = self.successors[state, np.minimum(choice, self.spec.branch - 1)]
            out[:, t] = state
        return out

    def loss_of(self, tokens: np.ndarray) -> float:
        """Mean cross-entropy (nats) of the true transition probabilities on ``tokens``
        (``[sequences, length]``): the oracle's loss on that sample."""
        prev, nxt = tokens[:, :-1].ravel(), tokens[:, 1:].ravel()
        match = self.successors[prev] == nxt[:, None]
        return float(-np.log(self.probs[prev][match]).mean())


class VocabOnly:
    """What the trainer needs of a tokenizer for token ids that need none: the vocabulary size."""

    def __init__(self, size: int):
        self.size = size

    def get_vocab_size(self) -> int:
        return self.size


def markov_tokens(spec: MarkovSpec, seq_len: int) -> Tuple[np.ndarray, MarkovChain]:
    """The token stream of ``spec`` for sequences of ``seq_len + 1`` tokens (back to back, at
    least ``spec.tokens`` in all), cached on disk, and its chain."""
    from ._files import atomic_path
    from .data import cache_dir

    chain = MarkovChain(spec)
    span = seq_len + 1
    sequences = max(2, -(-spec.tokens // span))
    dtype = np.uint16 if spec.vocab <= 1 << 16 else np.uint32
    path = cache_dir() / "markov" / f"{spec.key}-T{seq_len}.npy"
    if path.is_file():
        stream = np.load(path, mmap_mode="r")
        if stream.shape == (sequences * span,):
            return stream, chain
    rng = np.random.default_rng([spec.seed, seq_len])
    parts = []
    for start in range(0, sequences, 1 << 14):
        parts.append(chain.sample(min(1 << 14, sequences - start), span, rng).astype(dtype).ravel())
    stream = np.concatenate(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, stream)
    return stream, chain


class ArrayStore:
    """Token streams held as arrays, shaped like :class:`~smallbatch_rs.train.data.TokenStore`."""

    def __init__(self, shards: List[np.ndarray]):
        self.shards = shards
        self.total = sum(len(s) for s in shards)
