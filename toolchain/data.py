"""Data specs → tokenized, packed, cached and split token sequences.

A data spec is a `.txt` file, a folder of `.txt` files, a `.jsonl` file (one JSON object a line, text in
`text_field`), a `.parquet` file (text in column `text_field`) or `builtin:python-docs`.

Documents: a `.jsonl` line or `.parquet` row is one document; a `.txt` file is cut at blank lines into
paragraphs, joined greedily into documents of at most `TXT_DOCUMENT_CHARS` characters.

Split rule: a document goes to exactly one split, chosen by the SHA-256 of its text: the first 8 hex
digits as an integer modulo 10,000, divided by 10,000, is below `eval_fraction` → eval, below
`eval_fraction + calibration_fraction` → calibration, else train. So the splits never share a document,
do not depend on document order, and a document keeps its split when the corpus grows.

Packing: each split's documents, in corpus order, are tokenized without special tokens, each followed
by the tokenizer's EOS, concatenated and cut into rows of `seq_len` tokens; the last partial row is
dropped. Rows are stored as int32 `.npy` under the cache, keyed by the data's content, the tokenizer's
vocabulary, `seq_len`, `text_field` and the split fractions, and read back memory-mapped.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolchain.errors import UserError, setting
from toolchain.paths import atomic_output_dir, atomic_write_text, cache_dir
from toolchain.settings import DataConfig

log = logging.getLogger(__name__)

BUILTIN_DATA = {"builtin:python-docs": "Python documentation: pydoc topics and standard-library docstrings of this CPython"}
SPLITS = ("calibration", "train", "eval")
TXT_DOCUMENT_CHARS = 4000
PACKING_FORMAT_VERSION = "1"
TOKENIZE_CHUNK_DOCUMENTS = 256


@dataclass(frozen=True)
class PackedData:
    """Packed token rows of the three splits, memory-mapped from the cache."""

    directory: Path
    spec: str
    seq_len: int

    def split(self, name: str) -> np.ndarray:
        """The rows of one split (`all`: every split, in the order calibration, train, eval); an empty one is a user error."""
        if name == "all":
            return np.concatenate([np.load(self.directory / f"{split}.npy", mmap_mode="r") for split in SPLITS])
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        rows = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        if len(rows) == 0:
            documents = self.meta["documents"][name]
            fraction = {"eval": "data.eval_fraction", "calibration": "data.calibration_fraction"}.get(name)
            fixes = [f"lower {setting('data.seq_len')}"] + ([f"raise {setting(fraction)}"] if fraction else []) + (
                [f"evaluate another split ({setting('eval.split')} all)"] if name == "eval" else [])
            raise UserError(f"data {self.spec!r} has no {name} sequence: its {name} split holds {documents} documents, fewer tokens than one "
                            f"sequence of {self.seq_len}; add data, {', or '.join(fixes)}")
        return rows

    @property
    def meta(self) -> dict:
        return json.loads((self.directory / "meta.json").read_text())


def check_data_spec(spec: str) -> str:
    """The kind of a data spec (builtin, txt, txt-folder, jsonl, parquet), or a user error naming the fix."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_DATA:
            raise UserError(f"unknown built-in data {spec!r}; built-ins: {', '.join(BUILTIN_DATA)}")
        return "builtin"
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data {spec!r} does not exist; pass a .txt, .jsonl or .parquet file, a folder of .txt files, or builtin:python-docs")
    if path.is_dir():
        if not any(path.rglob("*.txt")):
            raise UserError(f"data folder {path} holds no .txt files; add some or pass a .jsonl/.parquet file")
        return "txt-folder"
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".parquet"):
        raise UserError(f"unknown data format {suffix or path.name!r} for {path}; use .txt, a folder of .txt, .jsonl, .parquet or builtin:python-docs")
    return suffix[1:]


def read_documents(spec: str, text_field: str = "text") -> list[str]:
    """The documents of a data spec, in corpus order, empty ones dropped."""
    kind = check_data_spec(spec)
    path = Path(spec).expanduser()
    if kind == "builtin":
        from toolchain.corpus import python_docs_documents

        return python_docs_documents()
    if kind == "txt-folder":
        return [doc for file in sorted(path.rglob("*.txt")) for doc in txt_documents(file)]
    if kind == "txt":
        return txt_documents(path)
    if kind == "jsonl":
        return jsonl_documents(path, text_field)
    return parquet_documents(path, text_field)


def txt_documents(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text: {exc}") from None
    documents, current = [], ""
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        if current and len(current) + len(paragraph) + 2 > TXT_DOCUMENT_CHARS:
            documents.append(current)
            current = paragraph
        else:
            current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        documents.append(current)
    return documents


def jsonl_documents(path: Path, text_field: str) -> list[str]:
    documents = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line_number} is not valid JSON ({exc.msg}); fix the line or remove it") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path}:{line_number} has no field {text_field!r}; set --text-field to the field that holds the text")
            if not isinstance(record[text_field], str):
                raise UserError(f"{path}:{line_number} field {text_field!r} is not a string")
            if record[text_field].strip():
                documents.append(record[text_field])
    return documents


def parquet_documents(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise UserError(f"cannot read parquet file {path}: {exc}") from None
    if text_field not in table.column_names:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(table.column_names)}); set --text-field")
    return [text for text in table.column(text_field).to_pylist() if isinstance(text, str) and text.strip()]


def split_of_document(text: str, eval_fraction: float, calibration_fraction: float) -> str:
    position = (int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10_000) / 10_000
    if position < eval_fraction:
        return "eval"
    if position < eval_fraction + calibration_fraction:
        return "calibration"
    return "train"


def source_fingerprint(spec: str, text_field: str) -> str:
    """Identity of the data's content: file bytes for local data, the CPython version for the built-in.

    A file's SHA-256 is remembered under the cache by (path, size, mtime), so the stages of a run do
    not each re-read a large corpus just to find their cache entry.
    """
    digest = hashlib.sha256(f"{text_field}\0".encode())
    if spec.startswith("builtin:"):
        from toolchain.corpus import python_docs_version

        digest.update(f"{spec}\0{python_docs_version()}".encode())
        return digest.hexdigest()
    path = Path(spec).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    memo_file = cache_dir() / "data" / "file-digests.json"
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    remembered = len(memo)
    for file in files:
        stat = file.stat()
        key = f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
        if key not in memo:
            file_digest = hashlib.sha256()
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    file_digest.update(block)
            memo[key] = file_digest.hexdigest()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{memo[key]}".encode())
    if len(memo) != remembered:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_file, json.dumps(memo))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{tokenizer.eos_token_id}\0{vocab}".encode()).hexdigest()


def pack_documents(documents: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """Tokenize documents, join them with EOS and cut the stream into rows of seq_len tokens."""
    stream = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(documents), TOKENIZE_CHUNK_DOCUMENTS):
        chunk = documents[start : start + TOKENIZE_CHUNK_DOCUMENTS]
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    rows = len(stream) // seq_len
    return np.asarray(stream[: rows * seq_len], dtype=np.int32).reshape(rows, seq_len)


def data_key(data: DataConfig, tokenizer) -> str:
    """Identity of the packed data: content, tokenizer vocabulary, sequence length, text field and split rule."""
    settings = {"source": source_fingerprint(data.spec, data.text_field), "tokenizer": tokenizer_fingerprint(tokenizer),
                "seq_len": data.seq_len, "text_field": data.text_field, "eval_fraction": data.eval_fraction,
                "calibration_fraction": data.calibration_fraction, "format": PACKING_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def prepare_data(data: DataConfig, tokenizer) -> PackedData:
    """Tokenize, pack and split the data once; later calls with the same settings read the cache.

    A split may come out empty (a small file has no eval document); `PackedData.split` refuses to
    hand out an empty split, so a stage fails only on the split it needs.
    """
    spec, seq_len = data.spec, data.seq_len
    check_data_spec(spec)
    key = data_key(data, tokenizer)
    directory = cache_dir() / "data" / key
    if (directory / "meta.json").is_file():
        return PackedData(directory, spec, seq_len)

    documents = read_documents(spec, data.text_field)
    if not documents:
        raise UserError(f"data {spec!r} is empty; it holds no text")
    by_split = {name: [] for name in SPLITS}
    for text in documents:
        by_split[split_of_document(text, data.eval_fraction, data.calibration_fraction)].append(text)
    packed = {name: pack_documents(docs, tokenizer, seq_len) for name, docs in by_split.items()}
    if not any(len(rows) for rows in packed.values()):
        raise UserError(f"data {spec!r} is too small: its {len(documents)} documents hold fewer tokens than one sequence of {seq_len}; "
                        f"add data or lower {setting('data.seq_len')}")
    settings = {"spec": spec, "key": key, "seq_len": seq_len, "text_field": data.text_field, "eval_fraction": data.eval_fraction,
                "calibration_fraction": data.calibration_fraction, "format": PACKING_FORMAT_VERSION}
    with atomic_output_dir(directory, overwrite=True) as tmp:
        for name, rows in packed.items():
            np.save(tmp / f"{name}.npy", rows)
        meta = dict(settings, documents={name: len(docs) for name, docs in by_split.items()}, sequences={name: len(rows) for name, rows in packed.items()})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("packed %s: %s sequences of %d tokens", spec, meta["sequences"], seq_len)
    return PackedData(directory, spec, seq_len)


def check_seq_len(seq_len: int, model_config) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UserError(f"sequence length {seq_len} exceeds the model's max_position_embeddings ({limit}); lower {setting('data.seq_len')}")


def shard_rows(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The rows a data-parallel rank reads: every world_size-th row starting at its rank."""
    return rows[rank::world_size]


def iterate_batches(rows: np.ndarray, batch_size: int, max_batches: int | None = None):
    """Yield int64 tensors of at most batch_size rows, in order, reading the memory map lazily."""
    count = 0
    for start in range(0, len(rows), batch_size):
        if max_batches is not None and count >= max_batches:
            return
        yield torch.from_numpy(np.asarray(rows[start : start + batch_size], dtype=np.int64))
        count += 1
