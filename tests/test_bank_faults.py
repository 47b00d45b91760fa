"""§3.4 the memory bank under faults: two processes writing one bank, a write that fails half-way (disk full),
a process killed at every file of an append or an overwrite, altered manifests and retrieval files, file modes.

Second processes are forked (they share the test's model and tokenizer, but have their own file descriptors
and locks, and die with SIGKILL where a test says so).
"""
import errno
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import stat

import faiss
import pytest
import torch

from mini_m3.checkpoint import save_weights
from mini_m3.memory import bank as bank_module
from mini_m3.memory.bank import BankError, MemoryBank
from mini_m3.memory.retrieve import Retriever
from mini_m3.utils import atomic_write_text, remove_stale_temps

N = 6  # references in the bank every test copies
RETRIEVER_FILES = ("index.faiss", "embedder.json", "texts.json", "manifest.json")
TEMP = re.compile(r"\..+\.[a-z0-9_]{8,}\.tmp")


@pytest.fixture(scope="module")
def model(tiny):
    return tiny


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory, model, tok, refs):
    path = tmp_path_factory.mktemp("faults") / "bank"
    MemoryBank.build(path, model, tok, refs[:N], progress=False)
    return path


@pytest.fixture
def path(bank_path, tmp_path):
    dst = tmp_path / "bank"
    shutil.copytree(bank_path, dst)
    return dst


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path, m):
    (path / "manifest.json").write_text(json.dumps(m))


def rehash(path):
    """Rewrite every size and checksum in the manifest to match the files: what a writer that checksums what
    it wrote, right or wrong, leaves."""
    m = manifest(path)

    def meta(p):
        return {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}

    t = meta(path / m["texts_file"])
    m["texts_bytes"], m["texts_sha256"] = t["bytes"], t["sha256"]
    m["retriever_files"] = {n: meta(path / m["retriever_dir"] / n) for n in RETRIEVER_FILES}
    for sh in m["shards"]:
        sh["files"] = {kind: meta(path / f"{sh['name']}.{kind}.npy") for kind in sh["files"]}
    write_manifest(path, m)


def committed_files(path):
    """The names a clean bank directory holds: the manifest and what it lists, nothing else."""
    m = manifest(path)
    keep = {"manifest.json", m["texts_file"], m["retriever_dir"]}
    return keep | {f"{sh['name']}.{kind}.npy" for sh in m["shards"] for kind in sh["files"]}


def _one_thread(target, *args):
    torch.set_num_threads(1)  # OpenMP with a pool inherited across fork() can hang: run the child on one thread
    target(*args)


def fork(target, *args):
    p = mp.get_context("fork").Process(target=_one_thread, args=(target, *args))
    p.start()
    return p


def finish(p):
    p.join(300)  # a guard against a hang, not a time limit
    if p.is_alive():
        p.kill()
        pytest.fail("child process hung")
    return p.exitcode


# ----------------------------------------------------------------------------------------------- two writers
def test_two_processes_appending_at_once_keep_every_reference(path, model, tok, refs, tmp_path):
    rounds = 5
    barrier = mp.get_context("fork").Barrier(2)

    def writer(w):
        bank = MemoryBank.open(path, model, tok)  # both open the same generation, then append together
        barrier.wait(300)
        got = {}
        for r in range(rounds):
            texts = [refs[N + 20 * w + 2 * r], refs[N + 20 * w + 2 * r + 1]]
            got.update(zip(bank.append(texts, progress=False), texts))
        (tmp_path / f"ids-{w}.json").write_text(json.dumps(got))

    procs = [fork(writer, w) for w in (0, 1)]
    assert [finish(p) for p in procs] == [0, 0]
    got = [json.loads((tmp_path / f"ids-{w}.json").read_text()) for w in (0, 1)]
    ids = [int(i) for g in got for i in g]
    assert sorted(ids) == list(range(N, N + 4 * rounds))  # unique, none lost
    bank = MemoryBank.open(path, model, tok, verify="full")
    assert len(bank) == N + 4 * rounds and bank.texts[:N] == refs[:N]
    for g in got:
        assert all(bank.texts[int(i)] == t for i, t in g.items())
    assert bank.search([bank.texts[-1]], 1)[0, 0] == N + 4 * rounds - 1
    assert bank.get(range(len(bank))).keys.shape[0] == len(bank)
    assert {p.name for p in path.iterdir()} == committed_files(path)


def test_a_writer_refuses_a_bank_rebuilt_since_it_opened_it(path, model, tok, refs):
    stale = MemoryBank.open(path, model, tok)
    MemoryBank.build(path, model, tok, refs[50:53], overwrite=True, progress=False)  # another writer
    with pytest.raises(BankError, match="rebuilt by another process.*open it again"):
        stale.append([refs[60]], progress=False)
    assert MemoryBank.open(path, model, tok).texts == refs[50:53]


def test_a_cold_start_flush_keeps_what_other_writers_committed_since(tmp_path, model, tok, refs):
    path = tmp_path / "cold"
    MemoryBank.build(path, model, tok, refs[:N], encode=False, progress=False)
    a, b = MemoryBank.open(path, model, tok), MemoryBank.open(path, model, tok)
    a.get([0, 1])
    b.append([refs[80]], progress=False)  # cold bank: stored, not encoded
    b.get([1])
    assert b.flush() == 1
    assert a.flush() == 1  # reference 1 is on disk already (b's); a writes 0 after b's commits
    bank = MemoryBank.open(path, model, tok, verify="full")
    assert bank.texts == refs[:N] + [refs[80]] and len(bank.retriever) == N + 1
    assert bank.cache_info()["encoded_on_disk"] == 2 and len(a) == N + 1
    assert torch.equal(bank.get([0, 1]).keys, a.get([0, 1]).keys)


def test_open_reads_again_when_a_writer_commits_meanwhile(path, model, tok, refs, monkeypatch):
    read_texts, writer = bank_module._read_texts, MemoryBank.open(path, model, tok)

    def commit_first(p, m):  # another writer commits (and deletes the old texts file) while we open
        monkeypatch.setattr(bank_module, "_read_texts", read_texts)
        writer.append([refs[70]], progress=False)
        return read_texts(p, m)

    monkeypatch.setattr(bank_module, "_read_texts", commit_first)
    assert MemoryBank.open(path, model, tok).texts == refs[:N] + [refs[70]]


# ----------------------------------------------------------------------------------------------- failed writes
def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (simulated)")


@pytest.mark.parametrize("where", ["retriever", "manifest"])
def test_a_failed_append_leaves_the_object_as_it_was_and_a_retry_is_consistent(path, model, tok, refs, monkeypatch,
                                                                                where):
    bank = MemoryBank.open(path, model, tok)
    new = refs[N:N + 3]
    if where == "retriever":
        monkeypatch.setattr(Retriever, "save", disk_full)
    else:
        write = bank_module.atomic_write_text
        monkeypatch.setattr(bank_module, "atomic_write_text",
                            lambda p, text: disk_full() if p.name == "manifest.json" else write(p, text))
    before = json.dumps(bank.manifest)
    with pytest.raises(OSError, match="No space"):
        bank.append(new, progress=False)
    monkeypatch.undo()
    assert json.dumps(bank.manifest) == before and len(bank) == N and len(bank.retriever) == N
    assert bank.retriever.texts == refs[:N] and bank.search([new[0]], N).shape == (1, N)
    assert bank.append(new, progress=False) == [N, N + 1, N + 2]  # the retry
    for b in (bank, MemoryBank.open(path, model, tok, verify="full")):
        assert len(b) == len(b.retriever) == N + 3 and b.retriever.texts == refs[:N + 3]
        found = b.search(new, 1)[:, 0].tolist()
        assert found == [N, N + 1, N + 2] and b.get(found).keys.shape[0] == 3


@pytest.mark.parametrize("case", ["retriever of a larger bank", "shard rows", "ids out of range"])
def test_open_refuses_counts_that_disagree_even_with_matching_checksums(path, model, tok, refs, tmp_path, case):
    if case == "retriever of a larger bank":  # the index the old retry bug saved: more entries than texts
        other = MemoryBank.build(tmp_path / "other", model, tok, refs[:N + 2], progress=False)
        d = path / manifest(path)["retriever_dir"]
        shutil.rmtree(d)
        shutil.copytree(other.path / other.manifest["retriever_dir"], d)
        match = "retrieval index .* holds 8 references, the bank 6"
    elif case == "shard rows":
        m = manifest(path)
        m["shards"][0]["n"] = N - 1
        write_manifest(path, m)
        match = r"holds .*\(6, .*the manifest and the model say .*\(5, "
    else:
        ids = path / f"{manifest(path)['shards'][0]['name']}.ids.npy"
        with open(ids, "r+b") as f:  # the last id (int64, little-endian) becomes 99
            f.seek(-8, os.SEEK_END)
            f.write((99).to_bytes(8, "little"))
        match = "ids outside 0..5"
    rehash(path)
    with pytest.raises(BankError, match=match):
        MemoryBank.open(path, model, tok)


# ----------------------------------------------------------------------------------------------- kills
def kill_at(k, action):
    """In a child process: run `action`, SIGKILLed just before its k-th file rename (its temp file written), or,
    past its last rename (the commit), when it starts deleting the previous generation's files."""
    real, calls = os.replace, [0]

    def replace(src, dst):
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        real(src, dst)

    os.replace = replace
    MemoryBank._remove_unreferenced = lambda self: os.kill(os.getpid(), signal.SIGKILL)
    action()


def count_renames(action, monkeypatch):
    calls, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (calls.append(d), real(s, d))[1])
    action()
    monkeypatch.undo()
    assert os.path.basename(calls[-1]) == "manifest.json"  # the commit is the last rename
    return len(calls)


@pytest.mark.parametrize("write", ["append", "overwrite"])
def test_a_writer_killed_at_any_point_leaves_a_whole_bank_and_the_next_write_cleans_up(
        bank_path, model, tok, refs, tmp_path, monkeypatch, write):
    new = refs[N:N + 2]

    def action(p):
        if write == "append":
            return lambda: MemoryBank.open(p, model, tok).append(new, progress=False)
        return lambda: MemoryBank.build(p, model, tok, new, overwrite=True, progress=False)

    shutil.copytree(bank_path, tmp_path / "count")
    n = count_renames(action(tmp_path / "count"), monkeypatch)
    assert n >= 10  # 4 shard files, texts, 4 retriever files, manifest
    for k in range(n + 1):
        path = tmp_path / f"k{k}"
        shutil.copytree(bank_path, path)
        assert finish(fork(kill_at, k, action(path))) == -signal.SIGKILL
        if k < n:  # killed before the commit: the previous bank, and the killed writer's temp file
            assert any(TEMP.fullmatch(p.name) for p in path.rglob("*")), k
            want = refs[:N]
        else:  # killed after it: the new bank, and the previous generation's files
            assert {p.name for p in path.iterdir()} != committed_files(path)
            want = refs[:N] + new if write == "append" else new
        bank = MemoryBank.open(path, model, tok, verify="full")
        assert bank.texts == want and len(bank.retriever) == len(want), k
        if k < n:
            assert torch.equal(bank.get(range(N)).keys, MemoryBank.open(bank_path, model, tok).get(range(N)).keys)
        bank.append([refs[90]], progress=False)  # the next writer deletes what the killed one left
        assert {p.name for p in path.iterdir()} == committed_files(path), k
        assert sorted(p.name for p in (path / manifest(path)["retriever_dir"]).iterdir()) == sorted(RETRIEVER_FILES)
        assert MemoryBank.open(path, model, tok, verify="full").texts == want + [refs[90]]


# ----------------------------------------------------------------------------------------------- altered files
def altered(m, case, tmp_path, path):
    if case == "dtype int8":
        m["dtype"] = "int8"
    elif case == "dtype float16":  # a valid value, but not what the shards hold
        m["dtype"] = "float16"
    elif case == "tokens_per_head":
        m["tokens_per_head"] = m["tokens_per_head"] // 2
    elif case == "no texts_sha256":
        del m["texts_sha256"]
    elif case == "no model_fingerprint":
        del m["model_fingerprint"]
    elif case == "texts_file outside":  # the same texts, outside the bank
        shutil.copy(path / m["texts_file"], tmp_path / "refs.jsonl")
        m["texts_file"] = "../refs.jsonl"
    elif case == "retriever_dir outside":
        shutil.copytree(path / m["retriever_dir"], tmp_path / "retriever-00001")
        m["retriever_dir"] = "../retriever-00001"
    elif case == "shard name outside":  # the same shard, outside the bank
        for f in path.glob(m["shards"][0]["name"] + ".*"):
            shutil.copy(f, tmp_path)
        m["shards"][0]["name"] = "../" + m["shards"][0]["name"]
    elif case == "seed a string":
        m["seed"] = "0"
    elif case == "shards not a list":
        m["shards"] = {"0": m["shards"][0]}
    elif case == "vq without quantizer":
        m["storage"] = "vq"
    elif case == "not an object":
        m = [m]
    return m


@pytest.mark.parametrize("case, match", [
    ("dtype int8", "'dtype' is 'int8', expected one of"),
    ("dtype float16", "holds uint16 .*say float16"),
    ("tokens_per_head", "holds memories in format .*tokens_per_head=4, but the model's config says .*=8"),
    ("no texts_sha256", r"lacks the field\(s\) \['texts_sha256'\]"),
    ("no model_fingerprint", r"lacks the field\(s\) \['model_fingerprint'\]"),
    ("texts_file outside", "'texts_file' is '../refs.jsonl'"),
    ("retriever_dir outside", "'retriever_dir' is '../retriever-00001'"),
    ("shard name outside", "'shards' is"),
    ("seed a string", "'seed' is '0', expected an integer"),
    ("shards not a list", "'shards' is .*expected a list"),
    ("vq without quantizer", "storage 'vq' with quantizer None"),
    ("not an object", "not a JSON object"),
])
def test_an_altered_manifest_is_refused_with_a_clear_error(path, model, tok, tmp_path, case, match):
    write_manifest(path, altered(manifest(path), case, tmp_path, path))
    with pytest.raises(BankError, match=match):
        MemoryBank.open(path, model, tok)


@pytest.mark.parametrize("name", RETRIEVER_FILES)
def test_every_retrieval_file_is_checked_before_it_is_parsed(path, model, tok, monkeypatch, name):
    f = path / manifest(path)["retriever_dir"] / name
    data = bytearray(f.read_bytes())
    for i in (4, 5, 6):  # three header bytes (of index.faiss: its dimension, made huge)
        data[i] ^= 0x7F
    f.write_bytes(bytes(data))

    def unchecked(*args, **kwargs):
        raise AssertionError("faiss parsed an index before its checksum was checked")

    monkeypatch.setattr(faiss, "read_index", unchecked)
    for verify in ("auto", "size", "none"):  # shards may skip their sha256; files read whole never do
        with pytest.raises(BankError, match="does not match its checksum"):
            MemoryBank.open(path, model, tok, verify=verify)


def test_an_index_rewritten_with_other_references_is_refused(path, model, tok, refs, tmp_path):
    other = MemoryBank.build(tmp_path / "other", model, tok, refs[40:40 + N], progress=False)
    d = path / manifest(path)["retriever_dir"]
    shutil.copy(other.path / other.manifest["retriever_dir"] / "index.faiss", d / "index.faiss")
    with pytest.raises(BankError, match="index.faiss does not match its checksum"):
        MemoryBank.open(path, model, tok)


# ----------------------------------------------------------------------------------------------- files on disk
def test_written_files_get_the_mode_the_umask_allows(tmp_path, model, tok, refs):
    old = os.umask(0o022)
    try:
        bank = MemoryBank.build(tmp_path / "bank", model, tok, refs[:2], progress=False)
        save_weights(model, tmp_path / "model.safetensors")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    files = [p for p in bank.path.rglob("*") if p.is_file()] + [tmp_path / "model.safetensors"]
    assert len(files) >= 10
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_remove_stale_temps_deletes_only_the_temp_files_of_atomic_writes(tmp_path):
    temps = [".manifest.json.0123456789ab.tmp", ".shard-00000-g00002.keys.npy.k2_x9qzp.tmp"]  # ours, mkstemp's
    kept = [".hidden", "notes.tmp", ".x.tmp", ".a.short.tmp", "manifest.json", "shard-00000-g00001.ids.npy"]
    for name in temps + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.0123456789ab.tmp").mkdir()
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == sorted(temps)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [".dir.0123456789ab.tmp"])
    assert remove_stale_temps(tmp_path / "missing") == []
