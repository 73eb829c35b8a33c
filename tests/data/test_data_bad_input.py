"""Bad input: clear errors naming the thing, or counted and logged skips."""

import logging
import os

import pytest

from datahelpers import real_tokens, take, text_docs, write_text_shards, write_unique_token_shards
from data import DataConfig, DataError, build_loader


def train(cfg, **kw):
    return build_loader(cfg, split="train", seq_len=8, batch_size=2, dp_rank=0, dp_size=1, seed=0, **kw)


def test_missing_shard_is_named(tmp_path):
    urls = write_text_shards(tmp_path / "s", text_docs(10))
    missing = str(tmp_path / "s" / "text-0007.tar")
    cfg = DataConfig(urls=urls + [missing], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="text-0007.tar"):
        train(cfg)


def test_missing_shard_in_brace_pattern_is_named(tmp_path):
    write_text_shards(tmp_path / "s", text_docs(20), per_shard=10)  # text-0000, text-0001
    cfg = DataConfig(urls=[str(tmp_path / "s" / "text-{0000..0002}.tar")], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="not found: .*text-0002.tar"):
        train(cfg)


def test_failing_pipe_command_is_named(tmp_path):
    cfg = DataConfig(urls=[f"pipe:cat {tmp_path}/no-such-file.tar"], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="no-such-file.tar"):
        train(cfg)


def truncate(path, keep=0.6):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def test_truncated_tar_skip_counts_and_keeps_readable_docs(tmp_path, caplog):
    docs = text_docs(30, max_len=2000)
    urls = write_text_shards(tmp_path / "s", docs, per_shard=10)
    truncate(urls[1])
    cfg = DataConfig(urls=urls, cache_dir=str(tmp_path / "c"), on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="meshformer.data"):
        loader = train(cfg)
    assert loader.stats["corrupt_shards"] == 1
    assert 20 < loader.stats["docs"] < 30  # the readable prefix of the damaged shard is kept
    assert "text-0001.tar" in caplog.text
    take(loader, 3)


def test_garbage_tar_is_an_error_when_asked(tmp_path):
    urls = write_text_shards(tmp_path / "s", text_docs(10), per_shard=5)
    with open(urls[0], "r+b") as f:
        f.write(os.urandom(600))  # clobber the first header
    cfg = DataConfig(urls=urls, cache_dir=str(tmp_path / "c"), on_corrupt="error")
    with pytest.raises(DataError, match="corrupt .*text-0000.tar"):
        train(cfg)
    cfg.on_corrupt = "skip"
    assert train(cfg).stats["corrupt_shards"] == 1


def test_shard_damaged_after_prepare_is_padded_or_raises(tmp_path):
    """With a manifest the damage shows only when reading: 'skip' pads (positions stay exact)."""
    urls, ids = write_unique_token_shards(tmp_path / "s", n_shards=3, docs_per_shard=40)
    truncate(urls[0], keep=0.5)
    cfg = DataConfig(urls=urls, tokenizer="pretokenized", cache_dir=str(tmp_path / "c"), shuffle=False,
                     on_corrupt="skip")
    loader = train(cfg)
    batches = []
    for b in loader:
        batches.append(b)
        if loader.state_dict()["epoch"] == 1:
            break
    got = set(real_tokens(batches))
    assert set(ids) - got and got < set(ids)  # lost the damaged part, nothing else
    first_lost = min(set(ids) - got)
    assert all(t in got for t in ids if t > max(set(ids) - got))
    assert first_lost > 1
    cfg.on_corrupt = "error"
    with pytest.raises(DataError, match="shard-000000.tar"):
        take(train(cfg), 200)


def test_samples_without_the_field_are_counted(tmp_path, caplog):
    docs = text_docs(10)
    urls = write_text_shards(tmp_path / "a", docs, per_shard=10)
    urls += write_text_shards(tmp_path / "b", docs[:4], per_shard=10, field="json")
    cfg = DataConfig(urls=urls, cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING, logger="meshformer.data"):
        loader = train(cfg)
    assert loader.stats["missing_field"] == 4 and loader.stats["docs"] == 10
    assert "has no field 'txt'" in caplog.text


def test_no_document_with_the_field_is_an_error(tmp_path):
    urls = write_text_shards(tmp_path / "a", text_docs(3), field="json")
    with pytest.raises(DataError, match="text_field"):
        train(DataConfig(urls=urls, cache_dir=str(tmp_path / "c")))


def test_empty_source_list_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="data.urls: empty"):
        DataConfig(urls=[]).validate()
    with pytest.raises(ValueError, match="data.urls: empty"):
        DataConfig(urls="").validate()
    empty_list = tmp_path / "none.list"
    empty_list.write_text("# nothing yet\n")
    with pytest.raises(DataError, match="names no shards"):
        train(DataConfig(urls=[str(empty_list)], cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize("field,value,match", [
    ("weights", [1.0, 2.0], "data.weights"),
    ("tokenizer", "sentencepiece", "data.tokenizer"),
    ("tokenizer", "hf:/nowhere/tokenizer.json", "no tokenizer file"),
    ("on_corrupt", "ignore", "data.on_corrupt"),
    ("num_workers", -1, "data.num_workers"),
    ("urls", ["builtin:wikipedia"], "unknown built-in"),
])
def test_config_errors_name_the_field(field, value, match):
    cfg = DataConfig()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_pretokenized_sources_with_different_tokenizers_are_refused(tmp_path):
    a, _ = write_unique_token_shards(tmp_path / "a", n_shards=1)
    b, _ = write_unique_token_shards(tmp_path / "b", n_shards=1)
    m = tmp_path / "b" / "manifest.json"
    m.write_text(m.read_text().replace('"tokenizer_ident": "test-ids"', '"tokenizer_ident": "other-ids"'))
    cfg = DataConfig(urls=a + b, tokenizer="pretokenized", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="tokenized differently"):
        train(cfg)
