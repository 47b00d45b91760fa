import json
import os
import random

import pytest

from mini_m3.tokenizer import Tokenizer

SPECIAL_LOOKALIKES = ["<s>", "</s>", "<pad>", "<ref>", "<s>Reference:", "a<s>b</s>c", "<<s>>", "</s><s>", "<ref><pad>"]
FIXED = [
    "", " ", "hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n", " " * 17,
    "記憶は知識の担い手である。", "显式记忆语言模型", "emoji 🧠🔥👩‍👩‍👧 flags 🇯🇵", "e\u0301 combining a\u0308\u0304",
    "mixed: naïve café — 数学 ∑ x² 🙂\x00\x7f", "\ufeffbom", "\U0010ffff\U000e0001",
]


def _corpus(n_words=20000, seed=0):
    rng = random.Random(seed)
    syl = ["me", "mo", "ry", "del", "know", "led", "ge", "ex", "pli", "cit", "spar", "se", "at", "ten", "tion", "記", "憶", "知"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(3000)]  # enough for 400 merges
    return [" ".join(rng.choice(words) for _ in range(50)) + "\n" for _ in range(n_words // 50)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(_corpus(), vocab_size=400)


def _random_strings(n=300, seed=1234):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(0, 40)
        if rng.random() < 0.5:  # random code points from valid (non-surrogate) ranges
            ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
            s = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(k))
        else:  # random bytes viewed as latin-1 text
            s = bytes(rng.randrange(256) for _ in range(k)).decode("latin-1")
        out.append(s)
    return out


@pytest.mark.parametrize("s", FIXED + SPECIAL_LOOKALIKES)
def test_round_trip_fixed(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_round_trip_random(tok):
    strings = _random_strings()
    for s, ids in zip(strings, tok.encode_batch(strings)):
        assert tok.decode(ids) == s
    assert tok.decode_batch(tok.encode_batch(strings)) == strings


def test_special_ids_fixed(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.ref_id) == (0, 1, 2, 3)
    assert [tok.token_to_id(t) for t in ["<pad>", "<s>", "</s>", "<ref>"]] == [0, 1, 2, 3]
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<ref>"]
    assert tok.reference_prefix_ids == (1, 3)
    assert Tokenizer.REFERENCE_PREFIX == "<s>Reference:"


@pytest.mark.parametrize("s", SPECIAL_LOOKALIKES)
def test_user_text_never_becomes_special(tok, s):
    assert all(i >= 4 for i in tok.encode(s)), "special-token string in user text was parsed as a special id"


def test_bos_eos_and_skip_special(tok):
    ids = tok.encode("memory", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tok.encode("memory")
    assert tok.decode(ids) == "memory"
    assert tok.decode(ids, skip_special=False) == "<s>memory</s>"
    assert tok.decode([*tok.reference_prefix_ids, *tok.encode(" x")], skip_special=False) == "<s><ref> x"
    assert tok.encode_batch(["a", "b"], add_bos=True) == [tok.encode("a", add_bos=True), tok.encode("b", add_bos=True)]


def test_encode_reference_puts_the_space_after_reference_colon(tok):
    assert tok.encode_reference("Paris is big") == tok.encode(" Paris is big")
    assert tok.encode_reference(" Paris") == tok.encode(" Paris") and tok.encode_reference("\nParis") == tok.encode("\nParis")
    assert tok.encode_reference("") == [] and tok.encode_references(["a", " b"]) == [tok.encode(" a"), tok.encode(" b")]
    with pytest.raises(TypeError):
        tok.encode_reference(b"bytes")


def test_input_validation(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(TypeError):
        tok.encode_batch(["ok", 3])
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("bad \udc80 surrogate")
    with pytest.raises(ValueError, match=rf"id {tok.vocab_size} .*vocab_size {tok.vocab_size}"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode([1.5])


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="260"):
        Tokenizer.train(["abc"], vocab_size=259)
    t = Tokenizer.train(["abc abc abc"], vocab_size=260)  # exactly bytes + specials: no merges, still lossless
    assert len(t) == t.vocab_size == 260
    assert t.decode(t.encode("abc 記憶 🧠")) == "abc 記憶 🧠"


def test_training_deterministic(tok):
    again = Tokenizer.train(_corpus(), vocab_size=400)
    assert again.fingerprint() == tok.fingerprint()
    assert again.to_json_str() == tok.to_json_str()
    assert Tokenizer.train(_corpus(), vocab_size=380).fingerprint() != tok.fingerprint()


def test_compression(tok):
    text = "".join(_corpus())
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 3
    assert len(tok) == 400


def test_save_load_round_trip(tok, tmp_path):
    p = tmp_path / "tok.json"
    tok.save(p)
    tok.save(p)  # overwrite in place
    assert os.listdir(tmp_path) == ["tok.json"]  # no temp files left behind
    header = json.loads(p.read_text("utf-8"))
    assert header["format"] == "mini_m3.tokenizer" and header["version"] == 1
    loaded = Tokenizer.load(p)
    assert loaded.fingerprint() == tok.fingerprint() and loaded.vocab_size == tok.vocab_size
    strings = FIXED + SPECIAL_LOOKALIKES + _random_strings(50)
    assert loaded.encode_batch(strings) == tok.encode_batch(strings)
    assert all(i >= 4 for i in loaded.encode("<s></s>"))  # special-token guard survives reload
    assert Tokenizer.from_json_str(tok.to_json_str()).fingerprint() == tok.fingerprint()
    assert "vocab_size=400" in repr(loaded)


def test_load_rejects_bad_files(tok, tmp_path):
    good = tok.to_json_str()
    obj = json.loads(good)

    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return p

    def edited(**kw):
        return json.dumps({**obj, **kw})

    tampered = json.loads(good)
    tampered["tokenizer"]["model"]["vocab"]["zzz_new"] = tok.vocab_size + 5
    bad = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00\xff\xfe not json",
        "empty": "",
        "list": "[1, 2, 3]",
        "format": edited(format="something.else"),
        "version": edited(version=2),
        "specials": edited(special_tokens={"<pad>": 0, "<s>": 2, "</s>": 1, "<ref>": 3}),
        "no_hf": edited(tokenizer=None),
        "hf_broken": edited(tokenizer={"model": {"type": "nope"}}),
        "tampered": json.dumps(tampered),
    }
    for name, data in bad.items():
        with pytest.raises(ValueError):
            Tokenizer.load(write(name + ".json", data))
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")
