"""Training data: documents, a byte-level BPE tokenizer, memory-mapped token shards, and the
order in which a run reads them.

The embedded default corpus needs no download: the interpreter's documentation topics
(``pydoc_data``) and the docstrings of the standard library's modules, read from their source
with ``ast`` (nothing is imported or executed), in a fixed order. It depends only on the Python
version. Users give text, Markdown, jsonl or parquet files, folders of them, or the name of a
Hugging Face dataset (when ``datasets`` is installed and the network allows).

Documents are joined with an end-of-text token, tokenized once into shards cached on disk, cut
into non-overlapping chunks of ``seq_len + 1`` tokens, and split into a held-out validation set
(the same for every seed) and a training set read once, in an order shuffled by the run's seed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

from ._files import atomic_path

EOT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".rst")
SHARD_TOKENS = 1 << 24
#: Chunks held out for validation are drawn with this seed, so runs with different seeds (and
#: different batch sizes) are evaluated on the same text.
VALIDATION_SEED = 0x5EED


def cache_dir() -> Path:
    """Where tokenizers and token shards are cached: ``$SMALLBATCH_CACHE``, else the user cache."""
    env = os.environ.get("SMALLBATCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smallbatch_rs"


# --- documents ------------------------------------------------------------------------------


def _stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40:
                        yield doc


def embedded_corpus() -> List[str]:
    """The default corpus (about 2 MB of English technical prose): documentation topics, then
    standard-library docstrings. Cached per interpreter, since parsing the library takes seconds."""
    stdlib = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(f"{sys.version}|{stdlib}".encode()).hexdigest()[:16]
    cached = cache_dir() / "corpus" / f"embedded-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    docs = _build_embedded_corpus()
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cached) as tmp:
        tmp.write_text(json.dumps(docs), encoding="utf-8")
    return docs


def _build_embedded_corpus() -> List[str]:
    topics: dict = {}
    try:
        from pydoc_data import topics as pydoc_topics

        topics = pydoc_topics.topics
    except ImportError:  # some distributions strip pydoc_data
        pass
    docs = [topics[k] for k in sorted(topics)]
    docs.extend(_stdlib_docstrings())
    return docs


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: each jsonl record needs a string field 'text'")
            yield text


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    if "text" not in pq.read_schema(path).names:
        raise ValueError(f"{path} has no 'text' column (columns: {pq.read_schema(path).names})")
    table = pq.read_table(path, columns=["text"])
    for text in table.column("text").to_pylist():
        if text:
            yield text


def _read_file(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield path.read_text(encoding="utf-8", errors="replace")
    elif suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise ValueError(f"don't know how to read {path}: use .txt, .md, .rst, .jsonl or .parquet")


def load_documents(source: Optional[str]) -> List[str]:
    """The documents of ``source``: None for the embedded corpus, a file, a folder (its readable
    files, recursively, in sorted order), or a Hugging Face dataset name."""
    if source is None or source == "embedded":
        return embedded_corpus()
    path = Path(source)
    if path.is_file():
        docs = list(_read_file(path))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl", ".parquet"))
        if not files:
            raise ValueError(f"data folder {source} has no .txt, .md, .rst, .jsonl or .parquet files")
        docs = [d for f in files for d in _read_file(f)]
    elif looks_like_path(source):
        raise ValueError(f"data file not found: {source}")
    else:
        docs = _hugging_face(source)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data {source} contains no text")
    return docs


def looks_like_path(source: str) -> bool:
    """Whether a ``--data`` value that does not exist was meant as a file (rather than a Hugging
    Face dataset name such as ``org/name``): absolute or relative-looking, or with a suffix."""
    return (
        source.startswith(("/", ".", "~", "\\"))
        or bool(Path(source).suffix)
        or source.count("/") > 1
    )


def _hugging_face(name: str) -> List[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"data file not found: {name} (to use a Hugging Face dataset of that name, pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - network, missing dataset: one line for the user
        raise ValueError(f"could not load Hugging Face dataset {name!r}: {e}") from None
    if "text" not in ds.column_names:
        raise ValueError(f"Hugging Face dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t]


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", errors="surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- tokenizer ------------------------------------------------------------------------------


def train_tokenizer(docs: Sequence[str], vocab_size: int):  # -> tokenizers.Tokenizer
    """A byte-level BPE with ``vocab_size`` entries (fewer if the corpus runs out of merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def get_tokenizer(docs: Sequence[str], corpus_key: str, vocab_size: int, path: Optional[str] = None):
    """The user's tokenizer.json, or a BPE trained on ``docs`` (cached by corpus and size)."""
    from tokenizers import Tokenizer

    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        return Tokenizer.from_file(path)
    cached = cache_dir() / "tokenizers" / f"bpe-{corpus_key}-{vocab_size}.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    tok = train_tokenizer(docs, vocab_size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cached) as tmp:
        tok.save(str(tmp))
    return tok


def eot_id(tok) -> int:
    ident = tok.token_to_id(EOT)
    if ident is None:
        # A user's tokenizer without our separator: its last id is as good as any.
        return tok.get_vocab_size() - 1
    return ident


# --- token shards ---------------------------------------------------------------------------


class TokenStore:
    """Tokens of a corpus in memory-mapped shards (uint16 when the vocabulary allows)."""

    def __init__(self, shard_paths: Sequence[Path], dtype: np.dtype):
        self.shards = [np.memmap(p, dtype=dtype, mode="r") for p in shard_paths]
        self.total = sum(len(s) for s in self.shards)

    @classmethod
    def build(cls, docs: Sequence[str], tok, key: str, progress: bool = False) -> "TokenStore":
        """Tokenizes ``docs`` once into shards under the cache (reused when ``key`` matches)."""
        vocab = tok.get_vocab_size()
        dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
        folder = cache_dir() / "shards" / key
        manifest = folder / "manifest.json"
        if manifest.is_file():
            meta = json.loads(manifest.read_text())
            return cls([folder / name for name in meta["shards"]], np.dtype(meta["dtype"]))
        folder.mkdir(parents=True, exist_ok=True)
        eot = eot_id(tok)
        names: List[str] = []
        buffer: List[np.ndarray] = []
        buffered = 0

        def flush() -> None:
            nonlocal buffer, buffered
            if not buffered:
                return
            name = f"shard{len(names):05d}.bin"
            with atomic_path(folder / name) as tmp:
                np.concatenate(buffer).astype(dtype).tofile(tmp)
            names.append(name)
            buffer, buffered = [], 0

        batch = 256
        bar = _progress(len(docs), "tokenizing", progress)
        for start in range(0, len(docs), batch):
            encodings = tok.encode_batch(list(docs[start : start + batch]))
            for enc in encodings:
                ids = np.asarray(enc.ids, dtype=np.int64)
                buffer.append(np.append(ids, eot))
                buffered += len(ids) + 1
            if buffered >= SHARD_TOKENS:
                flush()
            if bar is not None:
                bar.update(len(encodings))
        flush()
        if bar is not None:
            bar.close()
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps({"shards": names, "dtype": dtype.name, "vocab": vocab}))
        return cls([folder / n for n in names], dtype)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", file=sys.stderr, leave=False)


class ChunkedTokens:
    """Non-overlapping chunks of ``seq_len + 1`` tokens, split into validation and training.

    ``train_order`` is the one-epoch order for a seed; batch ``k`` of size ``B`` is chunks
    ``train_order[k*B : (k+1)*B]``, so a position in the data is one integer.
    """

    def __init__(self, store: TokenStore, seq_len: int, val_tokens: int, seed: int):
        self.store, self.seq_len = store, seq_len
        span = seq_len + 1
        index = [(s, i * span) for s, shard in enumerate(store.shards) for i in range(len(shard) // span)]
        if len(index) < 2:
            raise ValueError(
                f"the data has {store.total} tokens: too few for even two chunks of {span} tokens; "
                "use more text or a shorter --seq-len"
            )
        self.index = np.asarray(index, dtype=np.int64)
        n = len(index)
        n_val = min(max(1, -(-val_tokens // seq_len)), n // 10) if val_tokens > 0 else 0
        n_val = max(n_val, 1) if val_tokens > 0 else 0
        #: The best possible loss on this data, where it is known (see load_data).
        self.floor: Optional[float] = None
        split = np.random.default_rng(VALIDATION_SEED).permutation(n)
        self.val_chunks = np.sort(split[:n_val])
        train = split[n_val:]
        self.train_order = train[np.random.default_rng(seed).permutation(len(train))]

    @property
    def train_tokens(self) -> int:
        return len(self.train_order) * self.seq_len

    def chunk(self, k: int) -> np.ndarray:
        shard, start = self.index[k]
        return np.asarray(self.store.shards[shard][start : start + self.seq_len + 1], dtype=np.int64)

    def batch(self, chunk_ids: "Sequence[int] | np.ndarray"):
        """``(inputs, targets)`` as int64 tensors ``[len(chunk_ids), seq_len]``."""
        import torch

        rows = np.stack([self.chunk(int(k)) for k in chunk_ids])
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]

    def train_batch(self, position: int, batch_size: int, part: int = 0, parts: int = 1):
        """Part ``part`` of ``parts`` of training batch number ``position`` (parts: micro-batches
        or data-parallel ranks; each gets ``batch_size // parts`` sequences)."""
        per = batch_size // parts
        start = position * batch_size + part * per
        return self.batch(self.train_order[start : start + per])


def load_data(
    source: Optional[str], vocab_size: int, seq_len: int, val_tokens: int, seed: int,
    tokenizer_path: Optional[str] = None, progress: bool = False,
):
    """Documents -> tokenizer -> cached shards -> chunks. Returns ``(chunks, tokenizer)``; the
    chunks' ``floor`` is the best possible loss where it is known (``markov:`` data), else None.
    """
    if source is not None and source.startswith("markov:"):
        from .markov import ArrayStore, MarkovSpec, VocabOnly, markov_tokens

        spec = MarkovSpec.parse(source)
        stream, chain = markov_tokens(spec, seq_len)
        chunks = ChunkedTokens(ArrayStore([stream]), seq_len, val_tokens, seed)  # type: ignore[arg-type]
        chunks.floor = chain.entropy_rate
        return chunks, VocabOnly(spec.vocab)
    docs = load_documents(source)
    corpus_key = _digest(docs)
    tok = get_tokenizer(docs, corpus_key, vocab_size, tokenizer_path)
    tok_key = _digest([tok.to_str()])
    store = TokenStore.build(docs, tok, f"{corpus_key}-{tok_key}", progress=progress)
    return ChunkedTokens(store, seq_len, val_tokens, seed), tok
