"""Tokenizers that work offline: bytes, a BPE trained locally, and GPT-2's BPE from a vendored file.

| name   | vocab          | what                                                                  |
| byte   | 256            | UTF-8 bytes                                                           |
| bpe    | bpe_vocab_size | byte-level BPE trained on the corpus with Hugging Face `tokenizers`   |
| gpt2   | 50257          | GPT-2's BPE (tiktoken's r50k_base) from stableblocks/assets           |

The GPT-2 file is `whisper/assets/gpt2.tiktoken` from the MIT-licensed `openai-whisper` source
package, checked against its SHA-256 on every load: tiktoken's own `gpt2` encoding would
download its files on first use.
"""

from __future__ import annotations

import base64
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

GPT2_FILE = "gpt2.tiktoken"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k_base split pattern (GPT-2's, in a faster equivalent form).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256
TOKENIZERS = ("byte", "bpe", "gpt2")


class ByteTokenizer:
    name, vocab_size, eot = "byte", 256, None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken, from the vendored r50k_base file (no download)."""

    name, vocab_size, eot = "gpt2", 50257, GPT2_EOT

    def __init__(self):
        self.encoding = gpt2_encoding()

    def encode(self, text: str) -> np.ndarray:
        # Long texts in chunks of lines: tiktoken's regex is much faster on short strings.
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[i : i + 1024]) for i in range(0, len(lines), 1024)]
        ids = self.encoding.encode_ordinary_batch(chunks) if chunks else []
        return np.fromiter((t for chunk in ids for t in chunk), dtype=np.uint32)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


class BPETokenizer:
    """A byte-level BPE (Hugging Face `tokenizers`), trained on the corpus or loaded from its file."""

    name, eot = "bpe", None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, path: Path | None = None) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not 256 < vocab_size <= 2**32:
            raise ValueError(f"bpe_vocab_size: expected an int above 256, got {vocab_size!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        if path is not None:
            tmp = path.with_name(path.name + ".tmp")
            tok.save(str(tmp))
            tmp.replace(path)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> np.ndarray:
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[i : i + 256]) for i in range(0, len(lines), 256)]
        ids = [e.ids for e in self.tokenizer.encode_batch(chunks, add_special_tokens=False)]
        return np.fromiter((t for chunk in ids for t in chunk), dtype=np.uint32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def gpt2_encoding():
    """tiktoken.Encoding for GPT-2 (r50k_base) from the vendored file, checked against its SHA-256."""
    import tiktoken

    raw = resources.files("stableblocks").joinpath("assets", GPT2_FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GPT2_SHA256:
        raise RuntimeError(f"stableblocks/assets/{GPT2_FILE}: SHA-256 {digest} != {GPT2_SHA256}; the package is damaged")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=50257,
    )


def get_tokenizer(name: str, *, texts: list[str] | None = None, bpe_path: Path | None = None, bpe_vocab_size: int = 4096):
    """The named tokenizer; `bpe` is loaded from `bpe_path` if it exists, else trained on `texts` and saved there."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "bpe":
        if bpe_path is not None and Path(bpe_path).exists():
            return BPETokenizer.load(Path(bpe_path))
        if texts is None:
            raise ValueError("tokenizer 'bpe': trained on text; pre-tokenized data needs 'gpt2' or 'byte'")
        return BPETokenizer.train(texts, bpe_vocab_size, bpe_path and Path(bpe_path))
    raise ValueError(f"tokenizer: expected one of {TOKENIZERS}, got {name!r}")
