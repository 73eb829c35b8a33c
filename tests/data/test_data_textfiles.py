"""Raw text in data.urls: folders of .txt, JSON lines (.jsonl, .jsonl.gz, .jsonl.zst) and Parquet,
tokenized while training, split over DP ranks and resumed exactly like tar shards."""

import gzip
import json

import pytest
import torch

from datahelpers import slot_stream, take, text_docs
from data import DataConfig, DataError, build_loader
from data.documents import iter_documents
from data.textfiles import file_format
from data.tokenizer import ByteTokenizer

FORMATS = ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet"]
EOT = ByteTokenizer.eot_id


def write_corpus(folder, fmt, docs, files=3, key="text"):
    """`docs` in `files` files of format `fmt` (txt: one file per document) in `folder`, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        for i, d in enumerate(docs):
            (folder / f"doc{i:03d}.txt").write_text(d)
        return str(folder)
    per = -(-len(docs) // files)
    for f in range(files):
        part = docs[f * per:(f + 1) * per]
        path = folder / f"part{f}.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            # row groups of 3 rows: a file is streamed across several of them
            pq.write_table(pa.table({"id": list(range(len(part))), key: part}), path, row_group_size=3)
            continue
        raw = "".join(json.dumps({"id": i, key: d}) + "\n" for i, d in enumerate(part)).encode()
        if fmt.endswith(".gz"):
            raw = gzip.compress(raw)
        elif fmt.endswith(".zst"):
            import zstandard

            half = len(raw) // 2        # two frames, as pzstd and concatenated files have
            raw = zstandard.ZstdCompressor().compress(raw[:half]) + zstandard.ZstdCompressor().compress(raw[half:])
        path.write_bytes(raw)
    return str(folder)


def stream_docs(stream):
    """Documents (text) of a token stream with end-of-text separators (byte tokenizer)."""
    out, cur = [], []
    for t in stream:
        if t == EOT:
            out.append(bytes(cur).decode())
            cur = []
        else:
            cur.append(t)
    return out


def epoch(cfg, r=0, d=1, seq_len=16, batch_size=2):
    loader = build_loader(cfg, split="train", seq_len=seq_len, batch_size=batch_size, dp_rank=r, dp_size=d, seed=0)
    return take(loader, loader.batches_per_epoch())


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_streams_its_documents_split_over_dp_ranks(tmp_path, fmt):
    docs = text_docs(20, seed=5, max_len=60)
    entry = write_corpus(tmp_path / "corpus", fmt, docs)
    cfg = DataConfig(urls=[entry], cache_dir=str(tmp_path / "c"), shuffle=False)
    cfg.validate()
    files = sorted(p for p in (tmp_path / "corpus").iterdir())
    read = [bytes(ids.tolist()).decode() for f in files
            for ids in iter_documents(str(f), fmt=file_format(str(f)), mode="text", field="text",
                                      tokenizer=ByteTokenizer(), on_corrupt="error", stats={})]
    assert read == docs
    # two DP ranks: rank 0 holds the first lanes of the stream, rank 1 the rest, in order
    lanes = slot_stream(epoch(cfg, r=0, d=2), EOT) + slot_stream(epoch(cfg, r=1, d=2), EOT)
    assert stream_docs(lanes) == docs


def test_glob_and_listed_files_are_sources_too(tmp_path):
    docs = text_docs(9, seed=6, max_len=40)
    write_corpus(tmp_path / "corpus", "jsonl.zst", docs)
    listing = tmp_path / "files.txt"            # a .txt whose lines all name data files is a list
    listing.write_text("# my files\n" + "".join(f"corpus/part{i}.jsonl.zst\n" for i in range(3)))
    for entry in (str(tmp_path / "corpus" / "*.jsonl.zst"), str(listing)):
        cfg = DataConfig(urls=[entry], cache_dir=str(tmp_path / "c"), shuffle=False)
        assert stream_docs(slot_stream(epoch(cfg, batch_size=1), EOT)) == docs, entry


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("fmt,workers", [("jsonl.zst", 0), ("parquet", 2), ("txt", 0)])
def test_interrupted_and_resumed_stream_equals_the_uninterrupted_one(tmp_path, fmt, workers):
    docs = text_docs(30, seed=7, max_len=80)
    cfg = DataConfig(urls=[write_corpus(tmp_path / "corpus", fmt, docs)], cache_dir=str(tmp_path / "c"),
                     shuffle_buffer=4, num_workers=workers)

    def loader():
        return build_loader(cfg, split="train", seq_len=8, batch_size=2, dp_rank=1, dp_size=2, seed=3)

    steps = loader().batches_per_epoch()
    k, more = steps - 3, 7                 # stop inside epoch 0, resume into epoch 1
    straight = take(loader(), k + more)
    first = loader()
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))   # as a checkpoint stores it
    resumed = loader()
    resumed.load_state_dict(state)
    after = take(resumed, more)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(straight[k:], after))
    assert resumed.state_dict()["epoch"] == 1


def test_bad_raw_sources_are_named_in_one_line(tmp_path):
    def fails(entry, match, **kw):
        cfg = DataConfig(urls=[str(entry)], cache_dir=str(tmp_path / "c"), **kw)
        with pytest.raises(DataError, match=match):
            build_loader(cfg, split="train", seq_len=8, batch_size=2, dp_rank=0, dp_size=1, seed=0)

    (tmp_path / "table.csv").write_text("text\nhello\n")
    fails(tmp_path / "table.csv", r"cannot read .*table.csv: unknown file type; accepted: .*\.jsonl")
    (tmp_path / "nokey.jsonl").write_text('{"body": "hello"}\n')
    fails(tmp_path / "nokey.jsonl", r"no documents: no JSON line or Parquet row has a string field 'text'.*text_key")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\nnot json\n')
    fails(tmp_path / "broken.jsonl", r"broken.jsonl:2: not a JSON line")
    write_corpus(tmp_path / "pq", "parquet", ["a", "b"], files=1, key="content")
    fails(tmp_path / "pq", r"part0.parquet: Parquet file has no column 'text' \(it has \['id', 'content'\]\)")
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    fails(tmp_path / "fake.parquet", r"cannot read .*fake.parquet as Parquet")
    import zstandard

    whole = zstandard.ZstdCompressor().compress(b'{"text": "x"}\n' * 50)
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[:-9])        # a download cut inside the frame
    fails(tmp_path / "cut.jsonl.zst", r"corrupt or truncated data file .*cut.jsonl.zst", on_corrupt="error")
    write_corpus(tmp_path / "raw", "jsonl", ["a", "b"], files=1)
    fails(tmp_path / "raw", r"'pretokenized' reads shards written by `meshformer prepare`, but .*part0.jsonl is raw",
          tokenizer="pretokenized")
    # the text field is configurable
    cfg = DataConfig(urls=[str(tmp_path / "pq")], cache_dir=str(tmp_path / "c"), text_key="content", shuffle=False)
    assert stream_docs(slot_stream(epoch(cfg, batch_size=1), EOT)) == ["a", "b"]
