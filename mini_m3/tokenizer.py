"""§4.3 tokenizer: byte-level BPE with fixed special ids and the "<s>Reference:" BOS.

The paper trains a BPE tokenizer on its pretraining corpus; we do the same at
toy scale with the HuggingFace `tokenizers` library. Design choices:

* byte-level: every byte of UTF-8 is in the initial alphabet, so there is no
  <unk> and `decode(encode(s)) == s` holds exactly for every str that can be
  UTF-8 encoded (lone surrogates cannot, and raise ValueError).
* four special tokens with FIXED ids: <pad>=0, <s>=1, </s>=2, <ref>=3. <ref> is
  our single reserved token standing for the word "Reference:" in the paper's
  modified BOS "<s>Reference:" that prefixes memory (reference) texts, so that
  prefix is always the two ids (1, 3) whatever the vocabulary.
* user text is never parsed into special tokens: the string "<s>" in a document
  encodes as ordinary bytes. Special ids only enter via add_bos/add_eos or by
  the caller writing ids directly.
* one self-describing JSON file on disk (our header + the HF tokenizer JSON),
  and a sha256 fingerprint of vocab+merges that memory banks record, so a bank
  encoded with one tokenizer is never silently read with another.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from .config import parse_json
from .utils import atomic_write_text
from tokenizers import decoders, models, pre_tokenizers, trainers

FORMAT = "mini_m3.tokenizer"
VERSION = 1


class Tokenizer:
    PAD_ID, BOS_ID, EOS_ID, REF_ID = 0, 1, 2, 3
    SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<ref>")  # index == id
    REFERENCE_PREFIX = "<s>Reference:"  # the paper's BOS for reference texts; we encode it as (<s>, <ref>)
    MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # all bytes + specials

    def __init__(self, hf: _HFTokenizer):
        self._check_specials(hf)
        # not serialized by `tokenizers`, so set it on every construction: with True,
        # "<s>" typed inside user text is split like ordinary text instead of becoming id 1
        hf.encode_special_tokens = True
        self._hf = hf
        self._vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._fingerprint: str | None = None  # lazy; the wrapped tokenizer is never mutated

    # ---- training ---------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              show_progress: bool = False) -> "Tokenizer":
        """Deterministic. The result may be smaller than vocab_size when the corpus runs
        out of pairs seen >= min_frequency times; check `len(tok)`."""
        if vocab_size < cls.MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= 256 bytes + {len(cls.SPECIAL_TOKENS)} special tokens "
                             f"= {cls.MIN_VOCAB_SIZE}, got {vocab_size}")
        hf = _HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no invented leading space
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
            special_tokens=list(cls.SPECIAL_TOKENS),  # listed first -> ids 0..3
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes -> never unknown
        )
        hf.train_from_iterator((_check_text(t) for t in texts), trainer=trainer)
        return cls(hf)

    # ---- special ids ------------------------------------------------------

    @property
    def pad_id(self) -> int: return self.PAD_ID
    @property
    def bos_id(self) -> int: return self.BOS_ID
    @property
    def eos_id(self) -> int: return self.EOS_ID
    @property
    def ref_id(self) -> int: return self.REF_ID

    @property
    def reference_prefix_ids(self) -> tuple[int, int]:
        """Ids of the paper's "<s>Reference:" BOS, i.e. (<s>, <ref>)."""
        return (self.BOS_ID, self.REF_ID)

    # ---- encode / decode --------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._hf.encode(_check_text(text), add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        texts = [_check_text(t) for t in texts]  # also stops tuples being read as (a, b) pairs
        encs = self._hf.encode_batch(texts, add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encs]

    def encode_reference(self, text: str) -> list[int]:
        """Ids of a reference text as it follows "<s>Reference:" in a memory: with the space that follows a colon
        (unless the text already starts with whitespace), so that its first word tokenizes as the same word does
        mid-sentence in a query (" Monica", not "M" "on" "ica"). Every path that turns a reference into memory
        tokens uses this, so training, the bank and the length checks agree."""
        return self.encode_references([text])[0]

    def encode_references(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode_reference` for many texts (batched)."""
        texts = [_check_text(t) for t in texts]
        return self.encode_batch([t if not t or t[:1].isspace() else " " + t for t in texts])  # "" stays empty

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        # invalid UTF-8 byte sequences (e.g. a truncated multi-byte char) decode to U+FFFD
        return self._hf.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def decode_batch(self, batch: Iterable[Iterable[int]], *, skip_special: bool = True) -> list[str]:
        return self._hf.decode_batch([self._check_ids(ids) for ids in batch], skip_special_tokens=skip_special)

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return [self.BOS_ID] * add_bos + ids + [self.EOS_ID] * add_eos

    def _check_ids(self, ids) -> list[int]:
        if hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        out = []
        for i in ids:
            i = operator.index(i)  # TypeError for floats, strs, ...
            if not 0 <= i < self._vocab_size:  # `tokenizers` would silently drop it
                raise ValueError(f"token id {i} out of range for vocab_size {self._vocab_size}")
            out.append(i)
        return out

    # ---- vocabulary -------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    def id_to_token(self, id: int) -> str | None:
        return self._hf.id_to_token(id)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def fingerprint(self) -> str:
        """sha256 of the canonical vocab+merges; equal fingerprints <=> identical token ids."""
        if self._fingerprint is not None:
            return self._fingerprint
        model = json.loads(self._hf.to_str())["model"]
        canon = {"vocab": sorted(model["vocab"].items(), key=lambda kv: kv[1]),
                 "merges": [list(m.split(" ", 1)) if isinstance(m, str) else list(m) for m in model["merges"]]}
        blob = json.dumps(canon, ensure_ascii=False, separators=(",", ":"))
        self._fingerprint = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        return self._fingerprint

    # ---- serialization ----------------------------------------------------

    def to_json_str(self) -> str:
        return json.dumps({
            "format": FORMAT, "version": VERSION,
            "special_tokens": {t: i for i, t in enumerate(self.SPECIAL_TOKENS)},
            "vocab_size": self._vocab_size,
            "fingerprint": self.fingerprint(),
            "tokenizer": json.loads(self._hf.to_str()),
        }, ensure_ascii=False)

    @classmethod
    def from_json_str(cls, s: str) -> "Tokenizer":
        obj = parse_json(s, "tokenizer file")  # a ValueError for truncated, corrupt or hostile (deep) JSON
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format={obj.get('format') if isinstance(obj, dict) else None!r})")
        if obj.get("version") != VERSION:
            raise ValueError(f"unsupported {FORMAT} version {obj.get('version')!r}, expected {VERSION}")
        if obj.get("special_tokens") != {t: i for i, t in enumerate(cls.SPECIAL_TOKENS)}:
            raise ValueError(f"special tokens {obj.get('special_tokens')!r} differ from the fixed ids")
        if not isinstance(obj.get("tokenizer"), dict):
            raise ValueError("missing 'tokenizer' section")
        try:
            hf = _HFTokenizer.from_str(json.dumps(obj["tokenizer"]))
        except Exception as e:  # tokenizers raises a bare Exception
            raise ValueError(f"invalid HF tokenizer JSON: {e}") from None
        tok = cls(hf)
        if tok.fingerprint() != obj.get("fingerprint") or tok.vocab_size != obj.get("vocab_size"):
            raise ValueError("tokenizer fingerprint/vocab_size mismatch: file is corrupt or was edited")
        return tok

    def save(self, path: str | os.PathLike) -> None:
        """Atomic: a crash leaves either the old file or the new one, never half of one."""
        path = os.fspath(path)
        atomic_write_text(path, self.to_json_str())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        with open(path, "rb") as f:  # FileNotFoundError propagates as is
            raw = f.read()
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{os.fspath(path)}: tokenizer file is not UTF-8 (corrupt?): {e}") from None
        try:
            return cls.from_json_str(s)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None

    @staticmethod
    def _check_specials(hf: _HFTokenizer) -> None:
        added = hf.get_added_tokens_decoder()
        for i, t in enumerate(Tokenizer.SPECIAL_TOKENS):
            if hf.token_to_id(t) != i or i not in added or not added[i].special:
                raise ValueError(f"special token {t!r} must be a special token with id {i}, "
                                 f"got id {hf.token_to_id(t)}")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, fingerprint={self.fingerprint()[:12]})"


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")  # lone surrogates (e.g. from errors="surrogateescape") are not UTF-8
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode for UTF-8 (lone surrogate?): {e}") from None
    return text
