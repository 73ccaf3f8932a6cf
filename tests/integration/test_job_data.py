"""The job's data: the embedded default, text folders, .bin token shards, a local tokenizer folder."""

from __future__ import annotations

import numpy as np
import pytest

from distopt.job.config import load_config
from distopt.job.data import (
    LLMC_MAGIC,
    ByteTokenizer,
    HFTokenizer,
    Sampler,
    TokenStream,
    load_datasets,
    name_hash_percent,
    resolve_source,
    stdlib_root,
)


def test_stdlib_default_is_split_by_file_name_hash():
    files = resolve_source("stdlib", "", "", 2.0)
    assert files.kind == "text" and files.root == stdlib_root()
    assert len(files.train) > 100 and 0 < len(files.val) < len(files.train) / 10
    assert not set(files.train) & set(files.val)
    assert all(name_hash_percent(str(f.relative_to(files.root))) < 2.0 for f in files.val)
    assert not any("site-packages" in f.parts for f in files.train)


def test_text_folder_and_val_source(tmp_path):
    for i in range(30):
        (tmp_path / "docs" / f"d{i}").mkdir(parents=True)
        (tmp_path / "docs" / f"d{i}" / "a.txt").write_text(f"document {i} " * 40)
    (tmp_path / "docs" / "skip.md").write_text("not read by **/*.txt")
    cfg = load_config(None, [f"data.source={tmp_path / 'docs'}", "data.seq_len=16", "data.val_percent=20"])
    data = load_datasets(cfg, ByteTokenizer())
    expected = sum(len(f"document {i} " * 40) + 1 for i in range(30))  # each file + a separator
    assert data.train.num_tokens + data.val.num_tokens == expected
    assert "24 train / 6 val files" in data.description
    one = tmp_path / "one.txt"
    one.write_text("x" * 5000)
    cfg = load_config(None, [f"data.source={one}", "data.seq_len=16", "data.val_percent=10"])
    data = load_datasets(cfg, ByteTokenizer())
    assert data.val.num_tokens == 500 and data.train.num_tokens == 4501  # the tail is held out


def _write_llmc(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (LLMC_MAGIC, 1, len(tokens))
    with open(path, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_bin_shards_with_and_without_header(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_llmc(shards / "data_train_000.bin", np.arange(1000) % 32000)
    np.asarray(np.arange(500) + 7, dtype=np.uint16).tofile(shards / "data_train_001.bin")  # raw (nanoGPT)
    _write_llmc(shards / "data_val_000.bin", np.arange(300))
    cfg = load_config(None, [f"data.source={shards}", "data.seq_len=50"])
    data = load_datasets(cfg, ByteTokenizer())
    assert (data.train.num_tokens, data.val.num_tokens) == (1500, 300)
    assert data.train.num_windows == 19 + 9
    window = data.train.window(19)  # the first window of the raw shard
    assert window.tolist() == list(range(7, 58))


def test_sampler_is_a_pure_function_of_the_sample_index():
    stream = TokenStream([np.arange(10_000, dtype=np.uint16)], 8, "test")
    a, b = Sampler(stream, seed=3), Sampler(stream, seed=3)
    whole = a.batch(0, 40)
    assert np.array_equal(whole[25:], b.batch(25, 15))  # resuming at sample 25 gives the same rows
    first_epoch = {tuple(r[:2].tolist()) for r in a.batch(0, stream.num_windows)}
    assert len(first_epoch) == stream.num_windows  # every window once per epoch
    assert not np.array_equal(Sampler(stream, seed=4).batch(0, 40), whole)


def test_local_tokenizer_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    model = tokenizers.models.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(tmp_path / "tok")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello world " * 100)
    (tmp_path / "text" / "b.txt").write_text("world hello " * 100)
    hf = HFTokenizer(str(tmp_path / "tok"))
    assert hf.vocab_size == 4 and hf.eos_id == 1
    cfg = load_config(None, [f"data.source={tmp_path / 'text'}", f"data.tokenizer={tmp_path / 'tok'}", "data.seq_len=8",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    data = load_datasets(cfg, hf)
    assert data.train.num_tokens + data.val.num_tokens == 2 * 201
    assert len(list((tmp_path / "cache" / "tokens").glob("*.bin"))) == 2  # cached for the next run
    again = load_datasets(cfg, hf)
    assert again.train.window(0).tolist() == data.train.window(0).tolist()
