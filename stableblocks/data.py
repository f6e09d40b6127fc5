"""Training data: token streams from text or pre-tokenized files, sampled as random windows.

Sources (`load(source, ...)`):
- "bundled": the King James Bible shipped with the package (the default);
- a UTF-8 text file, or a folder of them (read recursively, hidden files skipped);
- nanoGPT `.bin` files: raw uint16 token ids, no header (`train.bin` / `val.bin`);
- llm.c / modded-nanogpt shards: a 1024-byte header of 256 int32 (magic 20240520, version 1,
  token count), then uint16 token ids. A `.bin` file is sniffed for the magic.
A folder of `.bin` files, or a glob such as `data/fineweb_*.bin`, is split by name: files whose
name contains "val" are the validation split. Text is tokenized once into a `.npy` cache (uint16,
or uint32 for vocabularies over 65536) next to the data, or under ~/.cache/stableblocks for the
bundled corpus; every batch opens a fresh memmap (nanoGPT's remedy for a memmap memory leak).
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .tokenizer import TOKENIZERS, get_tokenizer

CORPUS = "kjv.txt.xz"  # the King James Bible (public domain), from Debian's bible-kjv
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024
CACHE_NAME = ".stableblocks-cache"


def bundled_text() -> str:
    return lzma.decompress(_bundled_bytes()).decode("utf-8")


def _bundled_bytes() -> bytes:
    return resources.files("stableblocks.corpus").joinpath(CORPUS).read_bytes()


@dataclass(frozen=True)
class Shard:
    """A run of token ids inside one file: `length` tokens of `dtype` from byte `offset`."""

    path: str
    offset: int
    dtype: str
    length: int

    def tokens(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.length,))

    def slice(self, start: int, stop: int) -> "Shard":
        size = np.dtype(self.dtype).itemsize
        return Shard(self.path, self.offset + start * size, self.dtype, stop - start)


class TokenStream:
    """One split: shards read as one stream of windows (a window never crosses a shard boundary)."""

    def __init__(self, shards: list[Shard]):
        self.shards = [s for s in shards if s.length > 0]

    def __len__(self) -> int:
        return sum(s.length for s in self.shards)

    def max_token(self, shards: int = 8, tokens: int = 1 << 20) -> int:
        """The largest id in the first `tokens` ids of the first `shards` shards (a check that
        reads megabytes, not the whole data set)."""
        return max((int(s.tokens()[:tokens].max()) for s in self.shards[:shards]), default=0)

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator, rows: slice | None = None):
        """`batch_size` random windows -> inputs and next-token targets (B, seq_len), int64.

        All processes draw the same starts from the same generator and read only their `rows`,
        so a run's global batch does not depend on the number of processes.
        """
        room = np.array([max(0, s.length - seq_len) for s in self.shards])  # starts whose window fits
        if room.sum() == 0:
            raise ValueError(f"seq_len: {seq_len} does not fit in the data (longest shard has {max((s.length for s in self.shards), default=0)} tokens)")
        flat = torch.randint(int(room.sum()), (batch_size,), generator=generator).numpy()
        bounds = np.cumsum(room)
        which = np.searchsorted(bounds, flat, side="right")
        starts = flat - (bounds - room)[which]
        picks = list(zip(which, starts))[rows or slice(None)]
        maps = {}
        out = np.empty((len(picks), seq_len + 1), dtype=np.int64)
        for i, (w, s) in enumerate(picks):
            if w not in maps:
                maps[w] = self.shards[w].tokens()
            out[i] = maps[w][s : s + seq_len + 1]
        rows_t = torch.from_numpy(out)
        return rows_t[:, :-1], rows_t[:, 1:]


@dataclass
class Corpus:
    train: TokenStream
    val: TokenStream
    tokenizer: object | None  # the tokenizer that made the tokens (None: unknown, pre-tokenized)
    vocab_size: int
    source: str


# ---------------------------------------------------------------- formats


def write_nanogpt_bin(path, tokens) -> None:
    """nanoGPT's format: raw uint16, no header."""
    np.asarray(tokens, dtype=np.uint16).tofile(path)


def write_shard(path, tokens) -> None:
    """llm.c / modded-nanogpt's format: 256 int32 header (magic, version, count), then uint16."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def read_bin(path) -> Shard:
    """A `.bin` file as a Shard: an llm.c shard when its magic says so, otherwise nanoGPT raw uint16."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(SHARD_HEADER_BYTES)
    if len(head) >= 4 and np.frombuffer(head[:4], dtype=np.int32)[0] == SHARD_MAGIC:
        header = np.frombuffer(head.ljust(SHARD_HEADER_BYTES, b"\0"), dtype=np.int32)
        if header[1] != SHARD_VERSION:
            raise ValueError(f"data.source: {path} is an llm.c shard of version {header[1]}; expected version {SHARD_VERSION} (uint16 tokens)")
        count = int(header[2])
        if size != SHARD_HEADER_BYTES + 2 * count:
            raise ValueError(f"data.source: {path}: header says {count} tokens, the file holds {(size - SHARD_HEADER_BYTES) / 2:g}")
        return Shard(path, SHARD_HEADER_BYTES, "uint16", count)
    if size % 2:
        raise ValueError(f"data.source: {path} is neither an llm.c shard (magic {SHARD_MAGIC}) nor a nanoGPT .bin (raw uint16: even size), size {size}")
    return Shard(path, 0, "uint16", size // 2)


# ---------------------------------------------------------------- loading


def _files(source: str) -> tuple[list[Path], str]:
    """The files behind `source` and its kind: "bin" or "text"."""
    if not source.strip():
        raise ValueError("data.source: empty; expected 'bundled', a text file or folder, .bin files or a glob")
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"data.source: the pattern {source!r} matches no file")
    else:
        path = Path(source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise ValueError(f"data.source: the folder {source} holds no file")
        else:
            raise ValueError(f"data.source: no such file or folder: {source!r} (or 'bundled' for the bundled corpus)")
    bins = [p for p in files if p.suffix == ".bin"]
    texts = [p for p in files if p.suffix != ".bin"]
    if bins and texts:
        raise ValueError(f"data.source: {source!r} mixes .bin token files ({bins[0]}, ...) and text files ({texts[0]}, ...); "
                         "point it at one kind (e.g. a glob such as DIR/*.bin)")
    for p in files:
        if p.stat().st_size == 0:
            raise ValueError(f"data.source: {p} is empty; remove it or point --data.source at other data")
    return files, "bin" if bins else "text"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data.source: {path} is not UTF-8 text, a nanoGPT .bin or an llm.c shard ({e.reason} at byte {e.start})") from None


def _split_tail(shards: list[Shard], fraction: float) -> tuple[list[Shard], list[Shard]]:
    """Cut the concatenation of `shards`: the last `fraction` of the tokens become validation."""
    total = sum(s.length for s in shards)
    cut = int(total * (1 - fraction))
    train, val, seen = [], [], 0
    for s in shards:
        a, b = seen, seen + s.length
        if b <= cut:
            train.append(s)
        elif a >= cut:
            val.append(s)
        else:
            train.append(s.slice(0, cut - a))
            val.append(s.slice(cut - a, s.length))
        seen = b
    return train, val


def _write_npy(path: Path, tokens: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, tokens)
    tmp.replace(path)


def _npy_shard(path: Path) -> Shard:
    m = np.load(path, mmap_mode="r")
    return Shard(str(path), int(m.offset), m.dtype.name, len(m))


def load(source: str = "bundled", tokenizer: str = "auto", *, val_fraction: float = 0.05,
         cache_dir: str | Path | None = None, bpe_vocab_size: int = 4096) -> Corpus:
    """Open `source` as train and validation token streams (see the module docstring).

    tokenizer: "auto" (byte for text, gpt2 for .bin token files), "byte", "bpe" or "gpt2".
    Text is tokenized once and cached as .npy in `cache_dir` (default: next to the data).
    """
    if tokenizer not in ("auto", *TOKENIZERS):
        raise ValueError(f"data.tokenizer: expected 'auto' or one of {TOKENIZERS}, got {tokenizer!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction: expected a fraction in (0, 1), got {val_fraction!r}")
    if source == "bundled":
        files, kind = [], "text"
        key_parts = [hashlib.sha256(_bundled_bytes()).hexdigest()]
        default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stableblocks"
    else:
        files, kind = _files(source)
        key_parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        root = Path(source) if Path(source).is_dir() else files[0].parent
        default_cache = root / CACHE_NAME

    if kind == "bin":
        name = "gpt2" if tokenizer == "auto" else tokenizer
        tok = get_tokenizer(name) if name != "bpe" else None
        if tok is None:
            raise ValueError("data.tokenizer: 'bpe' is trained on text; .bin token files need 'gpt2' (or 'byte')")
        shards = [read_bin(p) for p in files]
        for shard in shards:
            if shard.length == 0:
                raise ValueError(f"data.source: {shard.path} holds no tokens; remove it or point --data.source at other data")
        val = [s for s, p in zip(shards, files) if "val" in p.name]
        train = [s for s, p in zip(shards, files) if "val" not in p.name]
        if not train:
            raise ValueError(f"data.source: {source!r} has only validation files (names containing 'val')")
        if not val:
            train, val = _split_tail(train, val_fraction)
        corpus = Corpus(TokenStream(train), TokenStream(val), tok, tok.vocab_size, source)
        top = max(corpus.train.max_token(), corpus.val.max_token() if len(corpus.val) else 0)
        if top >= tok.vocab_size:
            raise ValueError(f"data.tokenizer: token id {top} in {source!r} is outside {name!r}'s vocabulary of {tok.vocab_size}")
        return corpus

    name = "byte" if tokenizer == "auto" else tokenizer
    cache = Path(cache_dir) if cache_dir is not None else default_cache
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
    tag = f"{name}{bpe_vocab_size}" if name == "bpe" else name
    path = cache / f"tokens-{tag}-{key}.npy"
    bpe_path = cache / f"bpe{bpe_vocab_size}-{key}.json"
    texts = None
    if not path.exists() or (name == "bpe" and not bpe_path.exists()):
        texts = [bundled_text()] if source == "bundled" else [_read_text(p) for p in files]
    tok = get_tokenizer(name, texts=texts, bpe_path=bpe_path, bpe_vocab_size=bpe_vocab_size)
    if not path.exists():
        docs = [tok.encode(t) for t in texts]
        if tok.eot is not None:  # documents separated by <|endoftext|>, as GPT-2 was trained
            docs = [x for d in docs for x in (d, np.array([tok.eot], dtype=np.uint32))]
        ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.uint32)
        _write_npy(path, ids.astype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32))
    train, val = _split_tail([_npy_shard(path)], val_fraction)
    return Corpus(TokenStream(train), TokenStream(val), tok, tok.vocab_size, source)


def check_fits(corpus: Corpus, seq_len: int) -> None:
    """Both splits hold a window of seq_len + 1 tokens (checked before training, not at the
    first evaluation)."""
    for name, stream in (("training", corpus.train), ("validation", corpus.val)):
        longest = max(stream.shards, key=lambda s: s.length, default=None)
        if longest is None or longest.length <= seq_len:
            where = f"its longest piece ({longest.path}) has {longest.length} tokens" if longest else "it holds no tokens"
            fix = ("a larger --data.val-fraction, a longer val file" if name == "validation" else "more data") + " or a smaller --seq-len"
            raise ValueError(f"data.source: the {name} split of {corpus.source!r} is too short for --seq-len {seq_len}: "
                             f"{where}, a window needs {seq_len + 1}; use {fix}")
