"""Data formats and tokenizers, offline: nanoGPT .bin and llm.c shards round-trip, text is cached,
bad inputs are named, and GPT-2's BPE comes from the vendored file."""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np
import pytest
import torch

from stableblocks import data
from stableblocks.tokenizer import GPT2_SHA256, BPETokenizer, ByteTokenizer, GPT2Tokenizer, gpt2_encoding

TEXT = "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.\n" * 40


def windows_are_in(tokens: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Every row of x is a window of `tokens` and y is x shifted by one token."""
    seq = tokens.tolist()
    T = x.shape[1]
    starts = {i for i in range(len(seq) - T)}
    ok = torch.equal(x[:, 1:], y[:, :-1])
    for row, target in zip(x.tolist(), y.tolist()):
        ok &= any(seq[s : s + T] == row and seq[s + T] == target[-1] for s in starts)
    return ok


def test_nanogpt_bins_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 50257, 3000), rng.integers(0, 50257, 500)
    data.write_nanogpt_bin(tmp_path / "train.bin", train)
    data.write_nanogpt_bin(tmp_path / "val.bin", val)
    assert (tmp_path / "train.bin").stat().st_size == 2 * 3000  # raw uint16, no header
    corpus = data.load(str(tmp_path))
    assert corpus.tokenizer.name == "gpt2" and corpus.vocab_size == 50257
    assert np.array_equal(corpus.train.shards[0].tokens(), train) and np.array_equal(corpus.val.shards[0].tokens(), val)
    x, y = corpus.train.sample(6, 16, torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and x.shape == (6, 16) and windows_are_in(train, x, y)


def test_llmc_shards_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    shards = {name: rng.integers(0, 50257, n) for name, n in
              (("fineweb_train_000001.bin", 2000), ("fineweb_train_000002.bin", 1500), ("fineweb_val_000000.bin", 700))}
    for name, tokens in shards.items():
        data.write_shard(tmp_path / name, tokens)
    raw = np.fromfile(tmp_path / "fineweb_val_000000.bin", dtype=np.int32, count=3)
    assert raw.tolist() == [20240520, 1, 700]
    shard = data.read_bin(tmp_path / "fineweb_val_000000.bin")
    assert (shard.offset, shard.length) == (1024, 700) and np.array_equal(shard.tokens(), shards["fineweb_val_000000.bin"])
    for source in (str(tmp_path), str(tmp_path / "fineweb_*.bin")):  # a folder or a glob
        corpus = data.load(source)
        assert len(corpus.train) == 3500 and len(corpus.val) == 700
    # Windows come from both training shards and never cross from one into the other.
    x, y = corpus.train.sample(64, 8, torch.Generator().manual_seed(0))
    a, b = shards["fineweb_train_000001.bin"], shards["fineweb_train_000002.bin"]
    in_a = [windows_are_in(a, x[i : i + 1], y[i : i + 1]) for i in range(64)]
    in_b = [windows_are_in(b, x[i : i + 1], y[i : i + 1]) for i in range(64)]
    assert all(p or q for p, q in zip(in_a, in_b)) and any(in_a) and any(in_b)


def test_text_folder_is_tokenized_once_and_cached_next_to_it(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("Psalm 23: The LORD is my shepherd; I shall not want.\n" * 30)
    corpus = data.load(str(tmp_path), "byte", val_fraction=0.1)
    expected = np.frombuffer((TEXT + (tmp_path / "sub" / "b.md").read_text()).encode(), dtype=np.uint8)
    got = np.concatenate([s.tokens() for s in corpus.train.shards + corpus.val.shards])
    assert np.array_equal(got, expected) and len(corpus.val) == len(expected) - int(len(expected) * 0.9)
    cached = list((tmp_path / data.CACHE_NAME).glob("tokens-byte-*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).dtype == np.uint16
    # The second load reads the cache: no tokenizing.
    monkeypatch.setattr(ByteTokenizer, "encode", lambda self, text: pytest.fail("tokenized again"))
    assert len(data.load(str(tmp_path), "byte", val_fraction=0.1).train) == len(corpus.train)


def test_bpe_is_trained_locally_and_cached(tmp_path):
    (tmp_path / "kjv.txt").write_text(TEXT)
    corpus = data.load(str(tmp_path / "kjv.txt"), "bpe", bpe_vocab_size=300)
    tok = corpus.tokenizer
    assert isinstance(tok, BPETokenizer) and 256 < tok.vocab_size <= 300
    ids = np.concatenate([s.tokens() for s in corpus.train.shards + corpus.val.shards])
    assert len(ids) < len(TEXT.encode()) / 2 and tok.decode(ids) == TEXT  # merges compress; lossless
    again = data.load(str(tmp_path / "kjv.txt"), "bpe", bpe_vocab_size=300).tokenizer
    assert again.encode("the earth was void").tolist() == tok.encode("the earth was void").tolist()
    assert len(list((tmp_path / data.CACHE_NAME).glob("bpe300-*.json"))) == 1


def test_gpt2_tokenizer_is_offline_and_exact(monkeypatch):
    import tiktoken.load

    # Any attempt to fetch a file would fail here.
    monkeypatch.setattr(tiktoken.load, "read_file", lambda *a, **k: pytest.fail("tiktoken tried to read/download"))
    raw = resources.files("stableblocks").joinpath("assets", "gpt2.tiktoken").read_bytes()
    assert len(raw) == 835_554 and hashlib.sha256(raw).hexdigest() == GPT2_SHA256 == (
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")
    tok = GPT2Tokenizer()
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert gpt2_encoding().encode("<|endoftext|>", allowed_special="all") == [50256] and tok.vocab_size == 50257
    text = "ROMEO: But soft! What light through yonder window breaks?\n\n  It is the east.  "
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_text_gets_endoftext_between_documents(tmp_path):
    (tmp_path / "one.txt").write_text("Hello world")
    (tmp_path / "two.txt").write_text("Hello world")
    corpus = data.load(str(tmp_path), "gpt2", val_fraction=0.2)
    ids = np.concatenate([s.tokens() for s in corpus.train.shards + corpus.val.shards]).tolist()
    assert ids == [15496, 995, 50256, 15496, 995, 50256]


def test_rank_slices_make_the_global_batch():
    tokens = data.TokenStream([data.Shard(__file__, 0, "uint8", 2000)])
    full = tokens.sample(8, 16, torch.Generator().manual_seed(3))
    parts = [tokens.sample(8, 16, torch.Generator().manual_seed(3), slice(r * 4, r * 4 + 4)) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full[0]) and torch.equal(torch.cat([p[1] for p in parts]), full[1])


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        data.load(str(tmp_path / "missing"))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="neither an llm.c shard"):
        data.load(str(tmp_path / "odd.bin"))
    header = np.zeros(256, dtype=np.int32)
    header[:3] = 20240520, 2, 4
    (tmp_path / "v2.bin").write_bytes(header.tobytes() + np.arange(4, dtype=np.uint32).tobytes())
    with pytest.raises(ValueError, match="version 2"):
        data.read_bin(tmp_path / "v2.bin")
    data.write_shard(tmp_path / "short.bin", np.arange(100))
    (tmp_path / "short.bin").write_bytes((tmp_path / "short.bin").read_bytes()[:-10])
    with pytest.raises(ValueError, match="header says 100 tokens"):
        data.read_bin(tmp_path / "short.bin")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load(str(tmp_path / "latin1.txt"), cache_dir=tmp_path / "c")
    data.write_nanogpt_bin(tmp_path / "gpt2ids.bin", [15496, 995] * 50)
    with pytest.raises(ValueError, match="outside 'byte'"):
        data.load(str(tmp_path / "gpt2ids.bin"), "byte")
    with pytest.raises(ValueError, match="data.tokenizer"):
        data.load("bundled", "sentencepiece")
