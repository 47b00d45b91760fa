"""§4.2-§4.4 data pipeline: text folder -> dedup -> rules -> quality -> knowledge base + training tokens.

`run_pipeline` streams a folder of .txt files through the paper's filtering
(§4.2: MinHash dedup, rule filters, model-based quality filter), then builds
the knowledge base (§4.3): a deterministic subset of the kept documents (by a
hash of the doc id) is cut into <=128-token references for the memory bank.
As in the paper the knowledge base is a SUBSET of the pretraining data, so by
default those documents stay in the training text too; what keeps a training
sequence from simply reading its own text from memory is the §4.4 leakage rule,
`leakage_ok` / `forbidden_pairs`, which call `exceeds_overlap` (Eq. 6) from
`mini_m3.memory.retrieve` with the 90 % training threshold.

Memory stays bounded: documents that pass dedup and rules are spilled to a
temporary JSONL in `out_dir`, and every later pass (quality scores, tokenizer
training, tokenization) streams from it. Long documents are tokenized in pieces
(`text_pieces`) that give exactly the tokens of the whole, so one 10 MB file
never holds the HF tokenizer's per-character working memory for all of it at
once. Outputs, each written atomically:

* `references.jsonl` - one reference per line: id, doc_id, text, n_tokens, token_ids (exact;
  `text` is the decoded chunk, where a character cut by a chunk boundary shows as U+FFFD);
* `train_tokens.npy` - flat uint16/uint32 token stream `<s> doc </s> <s> doc </s> ...`,
  the stream `training_sequences` cuts; `load_train_sequences` gives (n, seq_len);
* `heldout.jsonl` - the held-out documents (doc_id, text), only when `heldout_fraction` > 0;
* `tokenizer.json`, `quality_scorer.json` (only if a scorer was trained), and
  `report.json` (written last: its presence marks a complete run).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from mini_m3.data.dedup import MinHashDeduplicator
from mini_m3.data.filters import DEFAULT_RULES, Rule, RuleFilter
from mini_m3.utils import atomic_write_text, new_file_mode
from mini_m3.data.quality import (LogisticQualityScorer, QualityScorer, heuristic_grade,
                                  select_by_quality)
from mini_m3.data.text import SkippedFile, batched, iter_documents, printable_path
from mini_m3.memory.overlap import TRAIN_LEAKAGE_THRESHOLD, exceeds_overlap
from mini_m3.tokenizer import Tokenizer

# ---- §4.4 leakage rule -------------------------------------------------------------


def leakage_ok(seq_tokens: Sequence[int], ref_tokens: Sequence[int],
               threshold: float = TRAIN_LEAKAGE_THRESHOLD) -> bool:
    """May this training sequence be paired with this reference? False when the reference
    overlaps the sequence (Eq. 6, overlap(t=sequence, r=reference)) by more than 90 %."""
    return not exceeds_overlap(seq_tokens, ref_tokens, threshold)


def forbidden_pairs(sequences: Sequence[Sequence[int]], references: Sequence[Sequence[int]],
                    candidates: Iterable[tuple[int, int]] | None = None, *,
                    threshold: float = TRAIN_LEAKAGE_THRESHOLD, progress: bool = True) -> list[tuple[int, int]]:
    """(sequence index, reference index) pairs that violate the leakage rule.

    `candidates` are the pairs to check, e.g. what retrieval proposed; the default checks
    all pairs, which is quadratic and meant for small sets only.
    """
    if candidates is None:
        candidates = ((i, j) for i in range(len(sequences)) for j in range(len(references)))
        total = len(sequences) * len(references)
    else:
        candidates = list(candidates)
        total = len(candidates)
    return [(i, j) for i, j in tqdm(candidates, total=total, desc="leakage", disable=not progress)
            if not leakage_ok(sequences[i], references[j], threshold)]


# ---- knowledge-base selection ----------------------------------------------------------


def is_reference_document(doc_id: str, reference_fraction: float, seed: int = 0) -> bool:
    """Deterministic split: the doc id's hash, read as a number in [0, 1), is below the fraction.
    Independent of corpus order and size, so adding files never reshuffles old ones."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64 < reference_fraction


def is_heldout_document(doc_id: str, heldout_fraction: float, seed: int = 0) -> bool:
    """The held-out split (evaluation of one's own corpus): like `is_reference_document`, with its own salt, so
    which documents are held out does not depend on which are in the knowledge base."""
    return is_reference_document(f"heldout:{doc_id}", heldout_fraction, seed)


# ---- report -----------------------------------------------------------------------------


@dataclass
class PipelineReport:
    documents_in: int = 0  # documents read (skipped files are not documents)
    skipped_files: list[dict] = field(default_factory=list)  # {path, reason}
    dropped_dedup: int = 0
    dedup_pairs: list[tuple[str, str, float]] = field(default_factory=list)  # (dropped, kept, est. Jaccard)
    dropped_by_rule: dict[str, int] = field(default_factory=dict)
    dropped_quality: int = 0
    dropped_documents: list[dict] = field(default_factory=list)  # {doc_id, reason}: every dropped document, named
    kept: int = 0  # documents_in == dropped_dedup + sum(dropped_by_rule) + dropped_quality + kept
    reference_documents: int = 0
    training_documents: int = 0
    heldout_documents: int = 0  # kept documents held out: never seen by the tokenizer or the training text
    heldout_references: int = 0  # references cut from held-out documents (only with heldout_references=True)
    references: int = 0
    reference_tokens: int = 0
    tokens_train: int = 0
    train_sequences: int = 0  # tokens_train // seq_len
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, plus "total"
    settings: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def documents_per_second(self) -> float:
        total = self.seconds.get("total", 0.0)
        return self.documents_in / total if total else float("nan")

    def table(self) -> str:
        rows = [("documents in", self.documents_in), ("files skipped", len(self.skipped_files)),
                ("dropped: near-duplicate", self.dropped_dedup)]
        rows += [(f"dropped: rule {name}", count) for name, count in self.dropped_by_rule.items()]
        rows += [("dropped: quality", self.dropped_quality), ("kept", self.kept),
                 ("  knowledge-base documents", self.reference_documents),
                 ("  training documents", self.training_documents),
                 ("  held-out documents", self.heldout_documents),
                 ("references", self.references), ("reference tokens", self.reference_tokens),
                 ("training tokens", self.tokens_train), ("training sequences", self.train_sequences)]
        rows += [(f"seconds: {stage}", f"{s:.2f}") for stage, s in self.seconds.items()]
        rows += [("documents / s", f"{self.documents_per_second:.0f}")]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "documents_per_second": self.documents_per_second},
                          ensure_ascii=False, indent=1)


# ---- the pipeline ------------------------------------------------------------------------


def run_pipeline(text_dir, out_dir, *, tokenizer: Tokenizer | None = None, vocab_size: int = 4096,
                 dedup_threshold: float = 0.8, rules: Sequence[Rule] = DEFAULT_RULES,
                 quality_keep_fraction: float = 1.0, quality_scorer: QualityScorer | None = None,
                 quality_sample_size: int = 2000, reference_length: int = 128, seq_len: int = 256,
                 reference_fraction: float = 0.5, references_in_training: bool = True,
                 heldout_fraction: float = 0.0, heldout_references: bool = False,
                 recursive: bool = True, split_paragraphs: bool = False, seed: int = 0,
                 progress: bool = True) -> PipelineReport:
    """Filter the .txt files of `text_dir` and write the knowledge base and training tokens to `out_dir`.

    * `quality_keep_fraction=1.0` (default) switches the model-based filter off: with no
      labels the scorer could only learn `heuristic_grade`, a stand-in grader, and the rules
      already remove the obvious junk. Below 1.0 the top share by `quality_scorer` is kept; if
      no scorer is given a `LogisticQualityScorer` is trained on a seeded sample of up to
      `quality_sample_size` documents graded by `heuristic_grade` (saved as quality_scorer.json).
    * `reference_fraction` of the kept documents (chosen by doc-id hash) become the knowledge
      base; `references_in_training=True` (the paper's setting) keeps them in the training
      text as well, False makes knowledge base and training text disjoint.
    * `heldout_fraction` of the kept documents (by doc-id hash, `is_heldout_document`) are held out for
      evaluation: written to `heldout.jsonl` (only when > 0), never in the tokenizer's training text nor the
      training tokens.
      `heldout_references=True` cuts every held-out document into references too ("knowledge added after
      training"); by default they are not in the knowledge base.
    * A tokenizer is trained on the kept, not held-out documents unless one is given.
    """
    for name, v in (("quality_keep_fraction", quality_keep_fraction), ("reference_fraction", reference_fraction),
                    ("heldout_fraction", heldout_fraction)):
        if not 0.0 <= v <= 1.0:  # NaN fails too
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    t_start = time.perf_counter()
    skipped: list[SkippedFile] = []
    documents = iter_documents(text_dir, recursive=recursive, split_paragraphs=split_paragraphs, errors=skipped)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").unlink(missing_ok=True)  # a report marks a complete run: not this one yet
    report = PipelineReport(settings=dict(
        text_dir=printable_path(text_dir), vocab_size=vocab_size, dedup_threshold=dedup_threshold,
        rules={r.name: r.threshold for r in rules}, quality_keep_fraction=quality_keep_fraction,
        reference_length=reference_length, seq_len=seq_len, reference_fraction=reference_fraction,
        references_in_training=references_in_training, heldout_fraction=heldout_fraction,
        heldout_references=heldout_references, split_paragraphs=split_paragraphs, seed=seed))
    seconds = {stage: 0.0 for stage in ("read", "dedup", "rules", "quality", "tokenizer", "write")}
    stage_fd, stage_path = tempfile.mkstemp(dir=out_dir, prefix=".tmp-stage-", suffix=".jsonl")
    try:
        # pass 1: read -> dedup -> rules, survivors spilled to disk
        dedup = MinHashDeduplicator(threshold=dedup_threshold, seed=seed)
        rule_filter = RuleFilter(rules)
        want_sample = quality_keep_fraction < 1.0 and quality_scorer is None
        sample, n_survivors, rng = [], 0, random.Random(seed)
        with os.fdopen(stage_fd, "w", encoding="utf-8") as stage:
            for doc in tqdm(_timed(documents, seconds, "read"), desc="filter", unit="doc", disable=not progress):
                report.documents_in += 1
                t = time.perf_counter()
                duplicate_of = dedup.add(doc.doc_id, doc.text)
                seconds["dedup"] += time.perf_counter() - t
                if duplicate_of is not None:
                    report.dropped_documents.append({"doc_id": doc.doc_id, "reason": f"near-duplicate of {duplicate_of}"})
                    continue
                t = time.perf_counter()
                failed = rule_filter.check(doc.text)
                seconds["rules"] += time.perf_counter() - t
                if failed is not None:
                    report.dropped_documents.append({"doc_id": doc.doc_id, "reason": f"rule {failed}"})
                    continue
                stage.write(json.dumps({"doc_id": doc.doc_id, "text": doc.text}, ensure_ascii=False) + "\n")
                n_survivors += 1
                if want_sample:  # reservoir sample: a uniform sample of the survivors in one pass
                    if len(sample) < quality_sample_size:
                        sample.append(doc.text)
                    elif (j := rng.randrange(n_survivors)) < quality_sample_size:
                        sample[j] = doc.text
        report.skipped_files = [{"path": s.path, "reason": s.reason} for s in skipped]
        report.dropped_dedup, report.dedup_pairs = dedup.num_dropped, list(dedup.dropped_pairs)
        report.dropped_by_rule = dict(rule_filter.dropped_by_rule)

        # pass 2 (optional): model-based quality filter, keep the top share
        t = time.perf_counter()
        keep = np.ones(n_survivors, dtype=bool)
        if quality_keep_fraction < 1.0 and n_survivors:
            if quality_scorer is None:
                quality_scorer = LogisticQualityScorer(seed=seed).fit_grades(
                    sample, [heuristic_grade(s) for s in sample], progress=progress)
                quality_scorer.save(out_dir / "quality_scorer.json")
                report.files["quality_scorer"] = str(out_dir / "quality_scorer.json")
            keep = select_by_quality((d["text"] for d in _read_jsonl(stage_path)), quality_scorer,
                                     quality_keep_fraction, progress=progress).keep
        report.dropped_quality = int(n_survivors - keep.sum())
        if report.dropped_quality:
            report.dropped_documents += [{"doc_id": d["doc_id"], "reason": "quality"}
                                         for d, k in zip(_read_jsonl(stage_path), keep) if not k]
        report.kept = int(keep.sum())
        seconds["quality"] = time.perf_counter() - t
        if report.kept == 0:  # one line: the CLI prints it as `mini-m3 train: error: ...`
            raise ValueError(
                f"no document of {printable_path(text_dir)} survived filtering: {report.documents_in} read "
                f"({len(skipped)} files skipped), {report.dropped_dedup} near-duplicates, dropped by rule "
                f"{report.dropped_by_rule}, {report.dropped_quality} by quality")

        def kept_documents() -> Iterator[dict]:
            return (d for d, k in zip(_read_jsonl(stage_path), keep) if k)

        # pass 3 (optional): tokenizer on the kept documents
        t = time.perf_counter()
        if tokenizer is None:
            tokenizer = Tokenizer.train((piece for d in kept_documents()
                                         if not is_heldout_document(d["doc_id"], heldout_fraction, seed)
                                         for piece in text_pieces(d["text"])),
                                        vocab_size)  # the same word counts, hence the same tokenizer
        tokenizer.save(out_dir / "tokenizer.json")
        seconds["tokenizer"] = time.perf_counter() - t

        # pass 4: knowledge-base split, references and the training token stream
        t = time.perf_counter()
        _write_outputs(kept_documents(), tokenizer, out_dir, report, reference_length=reference_length,
                       reference_fraction=reference_fraction, references_in_training=references_in_training,
                       heldout_fraction=heldout_fraction, heldout_references=heldout_references,
                       seed=seed, progress=progress)
        report.train_sequences = report.tokens_train // seq_len
        seconds["write"] = time.perf_counter() - t
    finally:
        Path(stage_path).unlink(missing_ok=True)

    report.seconds = {**{k: round(v, 4) for k, v in seconds.items()},
                      "total": round(time.perf_counter() - t_start, 4)}
    report.files.update(references=str(out_dir / "references.jsonl"), train_tokens=str(out_dir / "train_tokens.npy"),
                        tokenizer=str(out_dir / "tokenizer.json"), report=str(out_dir / "report.json"))
    if heldout_fraction > 0:
        report.files["heldout"] = str(out_dir / "heldout.jsonl")
    report.settings["tokenizer_fingerprint"] = tokenizer.fingerprint()
    atomic_write_text(out_dir / "report.json", report.to_json())
    return report


def _write_outputs(documents: Iterable[dict], tokenizer: Tokenizer, out_dir: Path, report: PipelineReport, *,
                   reference_length: int, reference_fraction: float, references_in_training: bool, seed: int,
                   progress: bool, heldout_fraction: float = 0.0, heldout_references: bool = False,
                   batch_size: int = 256) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
    ref_fd, ref_tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-references-")
    raw_fd, raw_tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-train-raw-")
    held_fd, held_tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-heldout-")
    npy_tmp = None
    try:
        with os.fdopen(ref_fd, "w", encoding="utf-8") as refs, os.fdopen(raw_fd, "wb") as raw, \
                os.fdopen(held_fd, "w", encoding="utf-8") as held:
            bar = tqdm(total=report.kept, desc="tokenize", unit="doc", disable=not progress)
            for batch in _batches_by_chars(documents, lambda d: len(d["text"]), batch_size):
                texts = [d["text"] for d in batch]
                for doc, ids in zip(batch, encode_in_pieces(tokenizer.encode_batch, texts, dtype)):
                    heldout = is_heldout_document(doc["doc_id"], heldout_fraction, seed)
                    if heldout:
                        report.heldout_documents += 1
                        held.write(json.dumps({"doc_id": doc["doc_id"], "text": doc["text"]}, ensure_ascii=False)
                                   + "\n")
                        is_reference = heldout_references
                    else:
                        is_reference = is_reference_document(doc["doc_id"], reference_fraction, seed)
                    if is_reference:
                        report.reference_documents += 1
                        before = report.references
                        # tokenized as memories read it (Tokenizer.encode_reference), not as training text
                        ref = encode_in_pieces(tokenizer.encode_references, [doc["text"]], dtype)[0]
                        for starts in batched(range(0, len(ref), reference_length), 1024):
                            chunks = [ref[i:i + reference_length].tolist() for i in starts]  # as chunk_references
                            for chunk, text in zip(chunks, tokenizer.decode_batch(chunks)):
                                refs.write(json.dumps({"id": report.references, "doc_id": doc["doc_id"],
                                                       "text": text, "n_tokens": len(chunk), "token_ids": chunk},
                                                      ensure_ascii=False) + "\n")
                                report.references += 1
                                report.reference_tokens += len(chunk)
                        if heldout:
                            report.heldout_references += report.references - before
                    if not heldout and (references_in_training or not is_reference):
                        report.training_documents += 1
                        raw.write(np.asarray([tokenizer.bos_id], dtype=dtype).tobytes() + ids.tobytes()
                                  + np.asarray([tokenizer.eos_id], dtype=dtype).tobytes())
                        report.tokens_train += len(ids) + 2
                bar.update(len(batch))
            bar.close()
        # raw bytes -> .npy (header + data) without loading the stream into memory
        fd, npy_tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-train-", suffix=".npy")
        os.close(fd)
        out = np.lib.format.open_memmap(npy_tmp, mode="w+", dtype=dtype, shape=(report.tokens_train,))
        if report.tokens_train:
            src = np.memmap(raw_tmp, dtype=dtype, mode="r")
            for start in range(0, len(src), 1 << 24):
                out[start:start + (1 << 24)] = src[start:start + (1 << 24)]
            del src
        out.flush()
        del out
        mode = new_file_mode(out_dir)  # mkstemp's files are 0o600: give them the umask's mode, as atomic_path does
        os.chmod(ref_tmp, mode)
        os.chmod(npy_tmp, mode)
        os.chmod(held_tmp, mode)
        os.replace(ref_tmp, out_dir / "references.jsonl")
        if heldout_fraction > 0:  # no split asked for, no file (and none left from an earlier run)
            os.replace(held_tmp, out_dir / "heldout.jsonl")
        else:
            (out_dir / "heldout.jsonl").unlink(missing_ok=True)
        os.replace(npy_tmp, out_dir / "train_tokens.npy")
    finally:
        for tmp in (ref_tmp, raw_tmp, held_tmp, npy_tmp):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


# ---- reading the outputs --------------------------------------------------------------------


def read_references(out_dir) -> Iterator[dict]:
    """Stream the references of a pipeline run: dicts with id, doc_id, text, n_tokens, token_ids."""
    return _read_jsonl(Path(out_dir) / "references.jsonl")


def read_heldout(out_dir) -> list[dict]:
    """The held-out documents of a pipeline run: dicts with doc_id and text ([] for a run with no held-out split)."""
    path = Path(out_dir) / "heldout.jsonl"
    return list(_read_jsonl(path)) if path.exists() else []


def load_train_tokens(out_dir, mmap: bool = True) -> np.ndarray:
    """The flat training token stream (memory-mapped by default)."""
    return np.load(Path(out_dir) / "train_tokens.npy", mmap_mode="r" if mmap else None)


def load_train_sequences(out_dir, seq_len: int | None = None) -> np.ndarray:
    """(n, seq_len) view of the token stream, the same sequences `training_sequences` yields
    (the tail shorter than seq_len is dropped). seq_len defaults to the run's setting."""
    if seq_len is None:
        seq_len = json.loads((Path(out_dir) / "report.json").read_text(encoding="utf-8"))["settings"]["seq_len"]
    tokens = load_train_tokens(out_dir)
    n = len(tokens) // seq_len
    return tokens[:n * seq_len].reshape(n, seq_len)


# ---- helpers --------------------------------------------------------------------------------

PIECE_CHARS = 1 << 16  # long texts are tokenized in pieces of about this many characters
BATCH_CHARS = 1 << 20  # and at most this many characters go to the HF tokenizer at once (~60 bytes each there)
_CUT = re.compile(r"(?<=\S) (?=\S)")


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """Cut `text` into pieces of about `size` characters whose tokens, concatenated, are exactly the tokens of
    the whole. Each cut is just before a space with a non-space on both sides: the byte-level pre-tokenizer
    (GPT-2's regex) splits there too (" word" starts a piece, and no piece runs across a space into it), and BPE
    never merges across its splits. A text with no such space after `size` characters stays in one piece."""
    start = 0
    while len(text) - start > size and (m := _CUT.search(text, start + size)) is not None:
        yield text[start:m.start()]
        start = m.start()
    yield text[start:]


def encode_in_pieces(encode, texts: Sequence[str], dtype) -> list[np.ndarray]:
    """`encode(texts)` (e.g. `tokenizer.encode_batch` or `.encode_references`) as arrays, calling `encode` on
    `text_pieces` of at most BATCH_CHARS characters at a time: memory is bounded by that, not by the longest
    text. `encode_references` adds its space before the first piece only, as later pieces start with one."""
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    pieces = ((i, piece) for i, text in enumerate(texts) for piece in text_pieces(text))
    for group in _batches_by_chars(pieces, lambda item: len(item[1]), max_items=256):
        for (i, _), ids in zip(group, encode([piece for _, piece in group])):
            parts[i].append(np.asarray(ids, dtype=dtype))
    return [np.concatenate(p) for p in parts]


def _batches_by_chars(items: Iterable, n_chars, max_items: int, max_chars: int = BATCH_CHARS) -> Iterator[list]:
    """Lists of consecutive items, each list at most `max_items` long and, unless it holds a single item, at most
    `max_chars` characters (`n_chars(item)`) in all."""
    batch, chars = [], 0
    for item in items:
        n = n_chars(item)
        if batch and (len(batch) == max_items or chars + n > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(item)
        chars += n
    if batch:
        yield batch



def _read_jsonl(path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)



def _timed(items: Iterable, seconds: dict, stage: str) -> Iterator:
    """Yield from `items`, adding the time spent producing each item to seconds[stage]."""
    iterator = iter(items)
    while True:
        t = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            seconds[stage] += time.perf_counter() - t
            return
        seconds[stage] += time.perf_counter() - t
        yield item
