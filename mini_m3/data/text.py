"""§4.3 knowledge base input: a folder of .txt files -> documents -> 128-token references and training sequences.

The paper tokenizes its knowledge base and cuts it into 128-token references
(§4.3), and trains on fixed-length sequences of concatenated documents (§4.4).
This module is the plain-text front end for both:

* `iter_documents` streams `Document`s from any folder of UTF-8 `.txt` files
  (one document per file, or one per blank-line-separated paragraph). Files that
  are unreadable, not valid UTF-8, or whose NAME is not valid UTF-8 are reported
  (with the reason) and skipped, never fatal.
* `chunk_references` cuts a document's tokens into consecutive <=128-token
  references; `training_sequences` concatenates documents as `<s> ... </s>` and
  cuts the stream into fixed-length sequences.
* `words` / `word_hashes` are the shared word splitter and stable word hash
  used by dedup, the rule filters and the quality scorer.
* `TextCorpus` is the in-memory convenience for small corpora (tests, notebooks);
  `mini_m3.data.pipeline.run_pipeline` is the streaming path for large ones.
"""

from __future__ import annotations

import os
import random
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    from mini_m3.tokenizer import Tokenizer

# ---- words ------------------------------------------------------------------

# Chinese/Japanese are written without spaces, so each ideograph or kana counts as
# one word. Otherwise every CJK document would be "one long word" and be dropped by
# the min_words / mean_word_length rules. (Hangul is space-separated: not listed.)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+(?:['’\-][^\W{_CJK}]+)*")


def words(text: str, *, lower: bool = True) -> list[str]:
    """Words of any script: runs of letters/digits (inner ' and - kept, so "don't" is one
    word), and each CJK character on its own. Punctuation and symbols are not words."""
    return _WORD_RE.findall(text.lower() if lower else text)


def word_hashes(tokens: Iterable[str]) -> np.ndarray:
    """Stable (process-independent, unlike `hash`) 64-bit hashes of words: crc32 then a
    splitmix64 finalizer so every bit is mixed. Used for shingles and hashed features."""
    h = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in tokens), dtype=np.uint64)
    return mix64(h)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorised (uint64 arithmetic wraps mod 2**64 on purpose)."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last may be shorter), from any iterable."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- documents --------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    doc_id: str  # path relative to the folder (posix), plus "#k" for the k-th paragraph
    text: str
    source: str  # the file it came from


@dataclass(frozen=True)
class SkippedFile:
    path: str  # printable: see `printable_path`
    reason: str


def printable_path(path) -> str:
    """A path as text that can be printed and written to UTF-8 files: bytes of a name that are not UTF-8
    (Python keeps them as lone surrogates) show as `\\xff`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def iter_documents(text_dir, *, recursive: bool = True, split_paragraphs: bool = False,
                   errors: list[SkippedFile] | None = None) -> Iterator[Document]:
    """Stream the documents of every `.txt` file under `text_dir`, files in sorted order.

    A file that cannot be read, is not valid UTF-8, or whose name (below `text_dir`) is not
    valid UTF-8 is appended to `errors` (if given) as `SkippedFile(path, reason)`, warned
    about, and skipped. Empty files yield nothing.
    Raises FileNotFoundError for a missing folder and ValueError for a folder with no
    .txt files; both checks run at call time, before the first document is read.
    """
    root = Path(text_dir)
    if not root.exists():
        raise FileNotFoundError(f"text folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    pattern = "**/*.txt" if recursive else "*.txt"
    files = sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"no .txt files in {root}" + ("" if recursive else " (recursive=False)"))
    return _read_files(root, files, split_paragraphs, errors)


def _read_files(root: Path, files: list[Path], split_paragraphs: bool,
                errors: list[SkippedFile] | None) -> Iterator[Document]:
    for path in files:
        rel, reason = path.relative_to(root).as_posix(), None
        if printable_path(rel) != rel:  # its doc id could be neither printed nor written to a UTF-8 file
            reason = "file name is not valid UTF-8"
        else:
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                reason = f"not valid UTF-8: {e}"
            except OSError as e:
                reason = f"unreadable: {e}"
        if reason is not None:
            warnings.warn(f"skipping {printable_path(path)}: {reason}", stacklevel=2)
            if errors is not None:
                errors.append(SkippedFile(printable_path(path), reason))
            continue
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        if not split_paragraphs:
            if text.strip():
                yield Document(rel, text.strip(), str(path))
            continue
        paragraphs = (p.strip() for p in re.split(r"\n\s*\n", text))
        for k, paragraph in enumerate(p for p in paragraphs if p):
            yield Document(f"{rel}#{k}", paragraph, str(path))


# ---- references and training sequences ---------------------------------------


def chunk_references(token_ids: list[int], reference_length: int = 128) -> list[list[int]]:
    """Cut one document's tokens into consecutive references of `reference_length` tokens.

    The pieces cover the document in order; only the last one may be shorter (it is
    kept, not padded, because it still carries knowledge). An empty document gives [].
    """
    if reference_length < 1:
        raise ValueError(f"reference_length must be >= 1, got {reference_length}")
    ids = list(token_ids)
    return [ids[i:i + reference_length] for i in range(0, len(ids), reference_length)]


def training_sequences(docs_token_ids: Iterable[list[int]], seq_len: int, *, bos_id: int = 1,
                       eos_id: int = 2) -> Iterator[list[int]]:
    """Concatenate documents as `<s> doc </s> <s> doc </s> ...` and cut the stream into
    sequences of exactly `seq_len` tokens (documents may span sequences). The final
    partial sequence is dropped, so every sequence has the same length. Deterministic."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    buffer: list[int] = []
    for ids in docs_token_ids:
        buffer.append(bos_id)
        buffer.extend(ids)
        buffer.append(eos_id)
        n_full = len(buffer) // seq_len * seq_len
        for i in range(0, n_full, seq_len):
            yield buffer[i:i + seq_len]
        del buffer[:n_full]


# ---- in-memory convenience ------------------------------------------------------


@dataclass
class TextCorpus:
    """A small text corpus held in memory: documents, a tokenizer, references, sequences.

    Every document is both cut into references and used as training text (the paper's
    knowledge base is a subset of the pretraining data; the train-time leakage rule, not
    a split, keeps a sequence from seeing its own reference). For filtering, dedup and a
    knowledge-base/training split on corpora larger than RAM use `run_pipeline`.
    """

    documents: list[Document]
    tokenizer: "Tokenizer"
    references: list[str]  # decoded reference texts, aligned with the two lists below
    reference_token_ids: list[list[int]]
    reference_doc_ids: list[str]
    training_sequences: list[list[int]]
    skipped: list[SkippedFile] = field(default_factory=list)

    @classmethod
    def from_dir(cls, text_dir, tokenizer: "Tokenizer | None" = None, *, vocab_size: int = 4096,
                 reference_length: int = 128, seq_len: int = 256, seed: int = 0,
                 recursive: bool = True, split_paragraphs: bool = False) -> "TextCorpus":
        """Read `text_dir`, train a BPE tokenizer on it unless one is given, and build the
        references (document order) and training sequences (documents concatenated in an
        order shuffled with `seed`, so sequences do not follow file names)."""
        from mini_m3.tokenizer import Tokenizer  # local: keep `words` importable without `tokenizers`

        skipped: list[SkippedFile] = []
        documents = list(iter_documents(text_dir, recursive=recursive, split_paragraphs=split_paragraphs,
                                        errors=skipped))
        if not documents:
            raise ValueError(f"no readable non-empty .txt documents in {text_dir} ({len(skipped)} skipped)")
        texts = [d.text for d in documents]
        if tokenizer is None:
            tokenizer = Tokenizer.train(texts, vocab_size)
        doc_ids = tokenizer.encode_batch(texts)

        ref_ids, ref_doc_ids = [], []
        # references are tokenized as memories read them (after "Reference:", with its space): see
        # Tokenizer.encode_reference; the training sequences keep the documents' own tokens
        for doc, ids in zip(documents, tokenizer.encode_references(texts)):
            for chunk in chunk_references(ids, reference_length):
                ref_ids.append(chunk)
                ref_doc_ids.append(doc.doc_id)
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        sequences = list(training_sequences((doc_ids[i] for i in order), seq_len,
                                            bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id))
        return cls(documents=documents, tokenizer=tokenizer, references=tokenizer.decode_batch(ref_ids),
                   reference_token_ids=ref_ids, reference_doc_ids=ref_doc_ids,
                   training_sequences=sequences, skipped=skipped)
