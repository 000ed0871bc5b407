"""Data specs, packing, splits and caching."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import corpus_documents, data_settings
from transformers import AutoTokenizer

from toolchain.data import iterate_batches, pack_documents, prepare_data, read_documents, shard_rows, split_of_document, txt_documents
from toolchain.errors import UserError


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_packing_inserts_eos_between_documents(tokenizer):
    rows = pack_documents(["the model reads", "a student writes"], tokenizer, seq_len=4)
    stream = [*tokenizer("the model reads", add_special_tokens=False)["input_ids"], 2,
              *tokenizer("a student writes", add_special_tokens=False)["input_ids"], 2]
    assert rows.dtype == np.int32 and rows.shape == (len(stream) // 4, 4)
    assert rows.reshape(-1).tolist() == stream[: rows.size]


def test_splits_are_disjoint_deterministic_and_complete(tokenizer, corpus_jsonl):
    data = prepare_data(data_settings(corpus_jsonl, 32, eval_fraction=0.1, calibration_fraction=0.1), tokenizer)
    meta = data.meta
    assert sum(meta["documents"].values()) == 400
    assert all(meta["sequences"][name] == len(data.split(name)) > 0 for name in ("calibration", "train", "eval"))
    documents = corpus_documents()
    splits = [split_of_document(doc, 0.1, 0.1) for doc in documents]
    assert {name: splits.count(name) for name in set(splits)} == meta["documents"]
    # The same inputs read the cache; the rule does not depend on order.
    assert prepare_data(data_settings(corpus_jsonl, 32, eval_fraction=0.1, calibration_fraction=0.1), tokenizer).directory == data.directory
    assert [split_of_document(doc, 0.1, 0.1) for doc in reversed(documents)] == splits[::-1]


def test_eval_split_holds_only_eval_documents(tokenizer, tmp_path):
    documents = corpus_documents(200)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in documents))
    data = prepare_data(data_settings(path, 16, text_field="body", eval_fraction=0.2, calibration_fraction=0.2), tokenizer)
    expected = pack_documents([d for d in documents if split_of_document(d, 0.2, 0.2) == "eval"], tokenizer, 16)
    assert np.array_equal(np.asarray(data.split("eval")), expected)


def test_cache_key_depends_on_seq_len_and_content(tokenizer, corpus_jsonl, tmp_path):
    a = prepare_data(data_settings(corpus_jsonl, 32), tokenizer)
    b = prepare_data(data_settings(corpus_jsonl, 16), tokenizer)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(corpus_jsonl.read_text() + json.dumps({"text": "one more document"}) + "\n")
    c = prepare_data(data_settings(changed, 32), tokenizer)
    assert len({a.directory, b.directory, c.directory}) == 3


def test_file_digest_is_remembered_until_the_file_changes(tmp_path):
    import os

    from toolchain.data import source_fingerprint

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n')
    first = source_fingerprint(str(path), "text")
    stat = path.stat()
    path.write_text('{"text": "b"}\n')  # same size: only the mtime tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source_fingerprint(str(path), "text") == first, "an unchanged (path, size, mtime) reuses the remembered digest"
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert source_fingerprint(str(path), "text") != first


def test_txt_file_folder_and_parquet_agree(tokenizer, tmp_path):
    documents = corpus_documents(60)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("\n\n".join(documents))
    (tmp_path / "one.txt").write_text("\n\n".join(documents))
    pq.write_table(pa.table({"text": documents}), tmp_path / "docs.parquet")
    assert read_documents(str(tmp_path / "one.txt")) == read_documents(str(tmp_path / "folder"))
    assert read_documents(str(tmp_path / "docs.parquet")) == documents
    # Paragraphs are grouped into documents of bounded size.
    assert all(len(d) <= 4000 for d in txt_documents(tmp_path / "one.txt"))
    assert "\n\n".join(txt_documents(tmp_path / "one.txt")) == "\n\n".join(documents)


def test_builtin_python_docs_is_deterministic():
    first = read_documents("builtin:python-docs")
    assert len(first) > 300 and sum(map(len, first)) > 1_000_000
    assert len(set(first)) == len(first)
    assert any("for" in d and "statement" in d for d in first[:100])
    assert first == read_documents("builtin:python-docs")


def test_batches_and_shards():
    rows = np.arange(40, dtype=np.int32).reshape(10, 4)
    batches = list(iterate_batches(rows, 3))
    assert [len(b) for b in batches] == [3, 3, 3, 1] and batches[0].dtype.is_floating_point is False
    assert len(list(iterate_batches(rows, 3, max_batches=2))) == 2
    shards = [shard_rows(rows, rank, 2) for rank in range(2)]
    assert sorted(np.concatenate(shards)[:, 0].tolist()) == rows[:, 0].tolist()


@pytest.mark.parametrize(
    "make_spec,message",
    [
        (lambda p: str(p / "missing.jsonl"), "does not exist"),
        (lambda p: (p / "d.csv").write_text("a,b\n") and str(p / "d.csv"), "unknown data format '.csv'"),
        (lambda p: (p / "e.txt").write_text("") is not None and str(p / "e.txt"), "is empty"),
        (lambda p: (p / "s.txt").write_text("tiny text") and str(p / "s.txt"), "too small"),
        (lambda p: (p / "f.jsonl").write_text('{"content": "x"}\n') and str(p / "f.jsonl"), "no field 'text'"),
        (lambda p: (p / "g.jsonl").write_text("not json\n") and str(p / "g.jsonl"), "not valid JSON"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no .txt files"),
        (lambda p: "builtin:wikipedia", "unknown built-in data"),
    ],
)
def test_bad_data(tokenizer, tmp_path, make_spec, message):
    with pytest.raises(UserError, match=message):
        prepare_data(data_settings(make_spec(tmp_path), 64), tokenizer)


def test_cli_bad_data_exit_2(cli, tiny_model, tmp_path):
    (tmp_path / "data.xml").write_text("<x/>")
    result = cli("eval", tiny_model, "--data", tmp_path / "data.xml")
    assert result.returncode == 2 and "unknown data format" in result.stderr and "Traceback" not in result.stderr


def test_seq_len_above_max_positions_refused(cli, tiny_model, corpus_jsonl):
    result = cli("eval", tiny_model, "--data", corpus_jsonl, "--seq-len", 512)
    assert result.returncode == 2 and "max_position_embeddings (256)" in result.stderr


def test_a_small_file_serves_the_split_it_has(tokenizer, tmp_path):
    """A few paragraphs land in one split; a stage fails only on the split it needs, naming the fixes."""
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"note {i}: the engine serves a student" for i in range(3)))
    packed = prepare_data(data_settings(path, 8), tokenizer)
    present = [name for name in ("calibration", "train", "eval") if packed.meta["sequences"][name]]
    assert present and len(packed.split("all")) == sum(packed.meta["sequences"].values())
    absent = next(name for name in ("calibration", "train", "eval") if name not in present)
    with pytest.raises(UserError, match=f"no {absent} sequence.*lower data.seq_len"):
        packed.split(absent)


def test_eval_of_a_small_file_needs_split_all(cli, tiny_model, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"note {i}: the model distills the teacher" for i in range(6)))
    refused = cli("eval", tiny_model, "--data", path, "--seq-len", 16)
    assert refused.returncode == 2 and "--split all" in refused.stderr and "--seq-len" in refused.stderr
    evaluated = cli("eval", tiny_model, "--data", path, "--seq-len", 16, "--split", "all", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["split"] == "all"
