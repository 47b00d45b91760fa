"""--device / --dtype (issue 20): the bf16 path runs on the CPU through the same code a GPU runs, and bad values are
one-line errors.

bf16 here means `torch.autocast` around forward and loss with float32 master weights (training, bank building, the
CLI) or weights cast with `cast_parameters` (inference). Tolerance for bf16 against float32 logits: 1e-2 relative
(Frobenius norm of the difference over the norm of the float32 logits); measured ~4e-3 (autocast) and ~6e-3 (cast)
on the random tiny model below.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from mini_m3 import Memory3, Memory3Config, Tokenizer
from mini_m3.checkpoint import autocast_to, cast_parameters, load_pretrained, resolve_device
from mini_m3.memory.bank import MemoryBank
from mini_m3.memory.encode import selection_scores
from mini_m3.model import MemoryKV, prefill_chunk_loop
from mini_m3.train import ChunkedData, TrainConfig, latest_checkpoint, train
from test_cli_errors import assert_user_error, cli, prose

BF16_RTOL = 1e-2
NO_CUDA = not torch.cuda.is_available()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = Memory3Config.from_name("tiny")
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(4, cfg.vocab_size, (2, 192), generator=g)
    shape = (2, 3, len(cfg.memory_layers), len(cfg.memory_heads), 40, cfg.head_dim)
    return Memory3(cfg).eval(), idx, MemoryKV(torch.randn(shape, generator=g), torch.randn(shape, generator=g))


def chunked_data(cfg, n: int = 8, seed: int = 0) -> ChunkedData:
    """Sequences of 2 chunks built from a few repeated patterns (learnable), each chunk reading one of 6 references."""
    g = torch.Generator().manual_seed(seed)
    pats = torch.randint(4, cfg.vocab_size, (3, 129), generator=g)
    seqs = pats[torch.arange(n) % 3]
    refs = [torch.randint(4, cfg.vocab_size, (40,), generator=g).tolist() for _ in range(6)]
    return ChunkedData(seqs[:, :-1], seqs[:, 1:], torch.randint(0, 6, (n, 2), generator=g), refs)


# ---- library ----------------------------------------------------------------------------------------------------


def test_bf16_logits_match_float32_in_every_attention_path(tiny):
    """Fused prefill with memory, the per-chunk loop and the plain Eq. 4 path, under autocast and with cast weights:
    within BF16_RTOL of float32; the RoPE tables stay float32 when the weights are cast."""
    model, idx, mem = tiny
    cast = Memory3(model.cfg).eval()
    cast.load_state_dict(model.state_dict())
    cast_parameters(cast, "bfloat16")
    with torch.inference_mode():
        ref = model(idx, memory=mem).logits
        with autocast_to("cpu", "bfloat16"):
            fused = model(idx, memory=mem).logits
            loop = prefill_chunk_loop(model, idx, mem).logits
            plain = model(idx, memory=mem, impl="plain").logits
        assert fused.dtype == torch.bfloat16
        for out in (fused, loop, plain):
            assert rel_err(out, ref) < BF16_RTOL
        assert cast.rope_cos.dtype == torch.float32 and cast.tok_emb.weight.dtype == torch.bfloat16
        out = cast(idx, memory=MemoryKV(mem.keys.bfloat16(), mem.values.bfloat16())).logits
        assert out.dtype == torch.bfloat16 and rel_err(out, ref) < BF16_RTOL


def test_prefix_cache_is_not_shared_between_autocast_and_float32(tiny):
    """The "<s>Reference:" K/V cached by a bf16 (autocast) pass must not be reused by a later float32 pass: the
    float32 prefill + decoding step gives the float32 logits of a model that never ran under autocast."""
    _, idx, _ = tiny
    model, fresh = Memory3(tiny[0].cfg).eval(), Memory3(tiny[0].cfg).eval()  # no prefix cached yet
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        with autocast_to("cpu", "bfloat16"):
            model(idx[:, :8])  # caches the prefix in bf16
        out = model(idx[:, :20], use_cache=True)
        step = model(idx[:, 20:21], cache=out.cache, use_cache=True).logits
        want = fresh(idx[:, :21]).logits[:, 20:21]
    assert step.dtype == torch.float32
    torch.testing.assert_close(step, want, atol=1e-5, rtol=1e-5)


def test_selection_scores_ignore_autocast():
    """The float32 scores of continual training (and float64 ones of banks) are computed in that dtype under bf16
    autocast too: bf16 scores would tie and pick other tokens."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 30, 16, generator=g), torch.randn(3, 2, 30, 16, generator=g)
    valid = torch.ones(3, 30, dtype=torch.bool)
    for dtype in (torch.float32, torch.float64):
        want = selection_scores(q, k, valid, 2, dtype=dtype)
        with autocast_to("cpu", "bfloat16"):
            got = selection_scores(q, k, valid, 2, dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, want)


def test_bf16_training_warmup_and_continual_learn_with_float32_master_weights():
    """TrainConfig(dtype="bfloat16", device="cpu"): both stages run (the continual one reads live-encoded memories
    made under autocast), losses are finite and go down, the weights and AdamW state stay float32, and the first
    bf16 loss is the float32 loss within BF16_RTOL."""
    cfg = Memory3Config.from_name("tiny")
    data = chunked_data(cfg)
    torch.manual_seed(0)
    model = Memory3(cfg)
    fp32 = Memory3(cfg)
    fp32.load_state_dict(model.state_dict())
    kw = dict(batch_size=4, lr=3e-3, quiet=True, device="cpu")
    w = train(model, data, TrainConfig(stage="warmup", steps=12, warmup_steps=1, dtype="bfloat16", **kw))
    c = train(model, data, TrainConfig(stage="continual", steps=8, warmup_steps=0, dtype="bfloat16", **kw))
    ref = train(fp32, data, TrainConfig(stage="warmup", steps=1, warmup_steps=1, **kw))
    for r in (w, c):
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["losses"][-1] < r["losses"][0]
    assert abs(w["losses"][0] - ref["losses"][0]) < BF16_RTOL * ref["losses"][0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_resume_moves_devices_but_not_dtypes(tmp_path):
    """`device` may change on resume (like threads); `dtype` may not; a checkpoint written before the fields
    existed counts as float32 and resumes."""
    cfg = Memory3Config.from_name("tiny")
    data = chunked_data(cfg)
    kw = dict(stage="warmup", steps=4, batch_size=4, quiet=True, checkpoint_every=2)
    train(Memory3(cfg), data, TrainConfig(**kw), out_dir=tmp_path)
    state_file = latest_checkpoint(tmp_path) / "train_state.json"
    state = json.loads(state_file.read_text())
    for field in ("device", "dtype"):  # as an older mini_m3 wrote it
        del state["train_config"][field]
    state_file.write_text(json.dumps(state))
    train(Memory3(cfg), data, TrainConfig(**kw, device="cpu"), out_dir=tmp_path)  # resumes at step 4: done
    with pytest.raises(ValueError, match="dtype='float32' there, 'bfloat16' now"):
        train(Memory3(cfg), data, TrainConfig(**kw, dtype="bfloat16"), out_dir=tmp_path)


@pytest.mark.parametrize("kw, needle", [
    (dict(dtype="float8"), "TrainConfig.dtype='float8'"),
    (dict(dtype="float16"), "loss scaling"),
    (dict(device="float8"), "TrainConfig.device='float8': 'float8' is not a device name"),
    (dict(device="tpu"), "is not a device name"),
    pytest.param(dict(device="cuda"), "CUDA is not available",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
])
def test_train_config_refuses_bad_device_and_dtype(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        TrainConfig(**kw)


def test_bank_built_under_autocast_opens_for_the_float32_model_and_follows_its_dtype(tmp_path, tiny):
    """A bank built in bf16 (autocast) keeps the float32 weights' fingerprint; `get` hands memories over in the
    model's dtype and on its device, from a host-side cache."""
    model, _, _ = tiny
    refs = [prose(random.Random(i), 30) for i in range(6)]
    tok = Tokenizer.train(refs * 5, 300)
    with autocast_to("cpu", "bfloat16"):
        MemoryBank.build(tmp_path / "bank", model, tok, refs, progress=False)
    bank = MemoryBank.open(tmp_path / "bank", model, tok)
    assert bank.get([0, 3]).keys.dtype == torch.float32
    half = Memory3(model.cfg).eval()
    half.load_state_dict(model.state_dict())
    bank = MemoryBank.open(tmp_path / "bank", half, tok)  # opened for the float32 weights, then they are cast
    cast_parameters(half, "bfloat16")
    got = bank.get([0, 3])
    assert got.keys.dtype == got.values.dtype == torch.bfloat16 and got.keys.device == resolve_device("cpu")
    assert all(t.device.type == "cpu" for row in bank._cache.values() for t in row)


# ---- command line ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """`mini-m3 train --device cpu --dtype bfloat16` on a small corpus (warmup and continual), then `build-bank`."""
    root = tmp_path_factory.mktemp("bf16")
    docs = root / "texts"
    docs.mkdir()
    for i in range(10):
        (docs / f"doc{i}.txt").write_text(prose(random.Random(200 + i), 160), encoding="utf-8")
    out = root / "run"
    flags = ["--device", "cpu", "--dtype", "bfloat16", "--quiet", "--threads", "1"]
    from mini_m3.cli import main
    assert main(["train", "--text-dir", str(docs), "--out", str(out), "--preset", "tiny", "--vocab-size", "300",
                 "--chunks-per-sequence", "2", "--batch-size", "4", "--warmup-steps", "8", "--continual-steps", "4",
                 "--lr", "3e-3", *flags]) == 0
    assert main(["build-bank", "--model", str(out / "model"), "--text-dir", str(docs), "--out", str(root / "bank"),
                 *flags]) == 0
    return root, out, flags


def test_cli_trains_in_bf16(bf16_run):
    root, out, _ = bf16_run
    logs = {st: [json.loads(l) for l in (out / st / f"{st}.jsonl").read_text().splitlines()]
            for st in ("warmup", "continual")}
    for st, recs in logs.items():
        assert len(recs) == {"warmup": 8, "continual": 4}[st]
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)
    assert logs["warmup"][-1]["loss"] < logs["warmup"][0]["loss"]
    state = json.loads((latest_checkpoint(out / "continual") / "train_state.json").read_text())
    assert state["train_config"]["dtype"] == "bfloat16" and state["train_config"]["device"] == "cpu"
    model, _ = load_pretrained(out / "model")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cli_generates_and_evaluates_in_bf16(capsys, bf16_run, tmp_path):
    root, out, flags = bf16_run
    code, text, err = cli(capsys, "generate", "--model", out / "model", "--bank", root / "bank", "--mode", "memory",
                          "--max-new-tokens", "6", "the river", *flags)
    assert code == 0 and "references per chunk" in err, err
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Where is the market?", "answer": "the village"}\n', encoding="utf-8")
    code, text, err = cli(capsys, "evaluate", "--model", out / "model", "--bank", root / "bank", "--qa", qa,
                          "--out", tmp_path / "qa.json", *flags)
    assert code == 0, err
    assert set(json.loads((tmp_path / "qa.json").read_text())["exact_match"]) == {"memory", "memory_off", "rag"}


@pytest.mark.parametrize("command", ["train", "build-bank", "generate", "evaluate"])
@pytest.mark.parametrize("flag, value, needle", [
    ("--dtype", "float8", "invalid choice: 'float8'"),
    ("--device", "float8", "'float8' is not a device name"),
    pytest.param("--device", "cuda", "CUDA is not available",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
])
def test_bad_device_or_dtype_is_one_usage_error(capsys, tmp_path, command, flag, value, needle):
    needs = {"train": ["--text-dir", tmp_path], "build-bank": ["--model", tmp_path, "--references", "r", "--out",
                                                               tmp_path / "b"],
             "generate": ["--model", tmp_path, "hello"], "evaluate": ["--model", tmp_path]}
    code, _, err = cli(capsys, command, flag, value, *needs[command])
    assert_user_error(code, err, command, f"argument {flag}:", needle, usage=True)


def test_train_refuses_float16(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--text-dir", tmp_path, "--dtype", "float16")
    assert_user_error(code, err, "train", "argument --dtype:", "invalid choice: 'float16'", usage=True)
