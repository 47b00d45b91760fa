"""§5 checkpoints under faults (issue 19, items 4 and 5): damaged or mismatched training checkpoints and model
directories give clear errors and lose nothing; kills at any point of a write leave a loadable state; a diverged
run stops and its NaN weights are never written or read. Kills are real: a forked child SIGKILLs itself at a
patched point of the code under test."""
import json
import os
import re
import signal
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mini_m3.checkpoint as C
import mini_m3.train as T
from conftest import tiny_model
from mini_m3 import Memory3, Memory3Config, Tokenizer
from mini_m3.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_pretrained, save_pretrained
from mini_m3.train import ChunkedData, TrainConfig, latest_checkpoint, load_checkpoint, train

CFG = Memory3Config.from_name("tiny")
TC = TrainConfig(stage="warmup", steps=6, batch_size=2, lr=3e-3, warmup_steps=0, decay_fraction=0.0,
                 checkpoint_every=2, keep_checkpoints=2, quiet=True)
IDS = torch.tensor([[1, 50, 60, 70, 300, 2]])


def make_data(seed: int = 0, n: int = 8) -> ChunkedData:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, CFG.vocab_size, (n, 128), generator=g)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100
    refs = [torch.randint(4, CFG.vocab_size, (20,), generator=g).tolist() for _ in range(4)]
    return ChunkedData(tokens, targets, torch.randint(0, 4, (n, 2), generator=g), refs)


def fresh() -> Memory3:
    torch.manual_seed(0)
    return Memory3(CFG)


def log_of(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "warmup.jsonl").read_text().splitlines() if l]


@pytest.fixture(scope="module")
def toks():
    a = Tokenizer.train(["Ada Lovelace was born in London in 1815 and wrote the first program."] * 50, 300)
    b = Tokenizer.train(["Alan Turing was born in London in 1912 and studied at Cambridge."] * 50, 300)
    assert a.fingerprint() != b.fingerprint()
    return a, b


@pytest.fixture(scope="module")
def full(tmp_path_factory, toks):
    """The uninterrupted run: 6 steps, checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("full")
    train(fresh(), make_data(), TC, out_dir=out, tokenizer=toks[0])
    return [r["loss"] for r in log_of(out)]


@pytest.fixture
def run4(tmp_path, toks):
    """A run stopped after step 4 (of 6): checkpoints step-2 and step-4, latest -> step-4."""
    out = tmp_path / "run"
    train(fresh(), make_data(), TrainConfig(**{**TC.__dict__, "steps": 4}), out_dir=out, tokenizer=toks[0])
    assert (out / "latest").read_text() == "step-0000004"
    return out


def step_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("step-*"))


def loads(ck: Path) -> bool:
    """Whether `ck` is a checkpoint that loads (weights, optimizer, RNG)."""
    model = fresh()
    try:
        load_checkpoint(ck, model, T.make_optimizer(model, TC))
    except Exception:  # noqa: BLE001 - any failure means "not loadable"
        return False
    return True


def killed_at(fn, *patches) -> int:
    """Run fn() in a forked child that SIGKILLs itself at the patched point (no cleanup, no finally blocks run);
    returns the child's exit code: -9 when it was killed there."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 3  # finished without reaching the kill point
        try:
            with pytest.MonkeyPatch.context() as mp:
                for obj, name, make in patches:
                    mp.setattr(obj, name, make(getattr(obj, name)))
                fn()
        except BaseException:
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def after_call(n: int = 1, when=lambda *a, **k: True):
    """A patch: let the original run, and die after its n-th call for which `when(args)` holds."""
    def make(orig):
        seen = [0]

        def hooked(*a, **k):
            r = orig(*a, **k)
            if when(*a, **k):
                seen[0] += 1
                if seen[0] == n:
                    die()
            return r
        return hooked
    return make


def half_delete(orig):
    """A patch of shutil.rmtree: the first checkpoint directory it is asked to delete loses one file, then death."""
    def hooked(p, *a, **k):
        if Path(p).name.startswith("step-"):
            (Path(p) / "train_state.json").unlink()
            die()
        return orig(p, *a, **k)
    return hooked


def before_call(n: int = 1):
    def make(orig):
        seen = [0]

        def hooked(*a, **k):
            seen[0] += 1
            if seen[0] == n:
                die()
            return orig(*a, **k)
        return hooked
    return make


# ----------------------------------------------------------------------------------------------- training checkpoints
KILL_POINTS = {  # (object, attribute, patch): where the first run (6 steps, checkpoints at 2, 4, 6) dies
    "in a training step": (T, "train_step", before_call(6)),
    "after the weights file": (T, "save_weights", after_call(2)),
    "after the optimizer file": (T, "save_file", after_call(2)),
    "after train_state.json, before the rename": (T, "atomic_write_text", after_call(
        2, lambda path, text: Path(path).name == "train_state.json")),
    "after the rename, before latest": (T, "atomic_write_text", before_call(4)),
    "after latest is written": (T, "atomic_write_text", after_call(
        2, lambda path, text: Path(path).name == "latest")),
    "in pruning, one checkpoint half deleted": (T.shutil, "rmtree", half_delete),
    "the first checkpoint renamed, no latest yet": (T, "atomic_write_text", before_call(2)),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_kill_anywhere_in_training_resumes_bit_identical(tmp_path, toks, full, point):
    out = tmp_path / "run"
    code = killed_at(lambda: train(fresh(), make_data(), TC, out_dir=out, tokenizer=toks[0]), KILL_POINTS[point])
    assert code == -signal.SIGKILL, f"the child was not killed at {point!r} (exit {code})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no latest pointer" in the last case
        train(fresh(), make_data(), TC, out_dir=out, tokenizer=toks[0])
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(6))
    assert [r["loss"] for r in log] == full  # bit for bit
    assert (out / "latest").read_text() == "step-0000006"
    assert [name for name in step_dirs(out) if loads(out / name)] == ["step-0000004", "step-0000006"]


@pytest.mark.parametrize("damage", ["latest names a missing directory", "no train_state.json",
                                    "truncated optimizer.safetensors", "truncated model.safetensors",
                                    "latest is garbage"])
def test_a_damaged_latest_checkpoint_is_an_error_that_loses_nothing(run4, toks, damage):
    ck = run4 / "step-0000004"
    if damage == "latest names a missing directory":
        (run4 / "latest").write_text("step-0000008")
    elif damage == "no train_state.json":
        (ck / "train_state.json").unlink()
    elif damage == "latest is garbage":
        (run4 / "latest").write_bytes(b"\xff\x00../../etc")
    else:
        f = ck / damage.split()[1]
        f.write_bytes(f.read_bytes()[:-100])
    intact = "step-0000004" if damage.startswith("latest") else "step-0000002"
    log_before = (run4 / "warmup.jsonl").read_bytes()
    with pytest.raises(ValueError, match=f"latest checkpoint .* is damaged.*newest intact checkpoint is .*{intact}"):
        train(fresh(), make_data(), TC, out_dir=run4, tokenizer=toks[0])
    assert (run4 / "warmup.jsonl").read_bytes() == log_before  # the log is kept
    assert loads(run4 / intact)  # the intact checkpoint is kept
    # following the hint resumes from it
    (run4 / "latest").write_text(intact)
    train(fresh(), make_data(), TC, out_dir=run4, tokenizer=toks[0])
    assert [r["step"] for r in log_of(run4)] == list(range(6))


def test_a_truncated_optimizer_file_names_the_file(run4):
    ck = run4 / "step-0000004"
    opt_file = ck / "optimizer.safetensors"
    opt_file.write_bytes(opt_file.read_bytes()[:-100])
    model = fresh()
    with pytest.raises(ValueError, match=r"optimizer\.safetensors .*truncated"):
        load_checkpoint(ck, model, T.make_optimizer(model, TC))
    # a checkpoint without a manifest (as version 1 wrote them): the reader's error names the file too
    state = json.loads((ck / "train_state.json").read_text())
    del state["files"]
    (ck / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"optimizer\.safetensors is not a readable safetensors file"):
        load_checkpoint(ck, model, T.make_optimizer(model, TC))


def test_a_flipped_byte_in_a_checkpoint_is_refused(run4):
    f = run4 / "step-0000004" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 1  # same size, other content: only the sha256 sees it
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the sha256"):
        load_checkpoint(run4 / "step-0000004", fresh())


def test_no_latest_pointer_resumes_from_the_newest_intact_checkpoint_with_a_warning(run4, toks, full):
    (run4 / "latest").unlink()
    with pytest.warns(UserWarning, match="no 'latest' pointer.*step-0000004"):
        train(fresh(), make_data(), TC, out_dir=run4, tokenizer=toks[0])
    assert [r["loss"] for r in log_of(run4)] == full


@pytest.mark.parametrize("change", ["batch_size", "seed", "lr", "other data", "other tokenizer"])
def test_resume_refuses_another_run_definition(run4, toks, change):
    tc, data, tok = TC, make_data(), toks[0]
    if change == "batch_size":
        tc = TrainConfig(**{**TC.__dict__, "batch_size": 4})
    elif change == "seed":
        tc = TrainConfig(**{**TC.__dict__, "seed": 1})
    elif change == "lr":
        tc = TrainConfig(**{**TC.__dict__, "lr": 1e-3})
    elif change == "other data":
        data = make_data(seed=1)
    else:
        tok = toks[1]
    match = {"batch_size": "batch_size=2 there, 4 now", "seed": "seed=0 there, 1 now", "lr": "lr=0.003 there",
             "other data": "training data differ",
             "other tokenizer": "tokenizer differs from the one it was trained with"}[change]
    log_before = (run4 / "warmup.jsonl").read_bytes()
    with pytest.raises(ValueError, match=f"cannot resume from .*step-0000004: .*{match}"):
        train(fresh(), data, tc, out_dir=run4, tokenizer=tok)
    assert (run4 / "warmup.jsonl").read_bytes() == log_before
    assert step_dirs(run4) == ["step-0000002", "step-0000004"]


def test_changing_steps_is_refused_when_it_changes_the_lr_of_steps_taken(tmp_path):
    tc = TrainConfig(**{**TC.__dict__, "steps": 4, "decay_fraction": 0.5})  # decays over steps 2 and 3
    train(fresh(), make_data(), tc, out_dir=tmp_path)
    with pytest.raises(ValueError, match="steps=4 there, 8 now, which changes the learning rate of the 4 steps"):
        train(fresh(), make_data(), TrainConfig(**{**tc.__dict__, "steps": 8}), out_dir=tmp_path)
    with pytest.raises(ValueError, match="it is at step 4, past steps=3"):
        train(fresh(), make_data(), TrainConfig(**{**tc.__dict__, "steps": 3}), out_dir=tmp_path)


def test_resume_allows_what_does_not_change_the_run(run4, toks, full):
    tc = TrainConfig(**{**TC.__dict__, "quiet": True, "log_every": 1, "threads": 1, "checkpoint_every": 1,
                        "keep_checkpoints": 3, "steps": 7})  # steps: a longer stable phase, same LR so far
    train(fresh(), make_data(), tc, out_dir=run4, tokenizer=toks[0])
    assert [r["loss"] for r in log_of(run4)][:6] == full


def test_resume_false_over_checkpoints_is_refused(run4, toks):
    log_before = (run4 / "warmup.jsonl").read_bytes()
    with pytest.raises(ValueError, match="holds checkpoints of an earlier warmup run.*resume=False"):
        train(fresh(), make_data(), TC, out_dir=run4, tokenizer=toks[0], resume=False)
    assert (run4 / "warmup.jsonl").read_bytes() == log_before


def test_a_torn_last_log_line_is_dropped_with_a_warning(run4, toks, full):
    log = run4 / "warmup.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 4, "stage": "warmup", "lo')  # killed while writing step 4's line
    with pytest.warns(UserWarning, match=re.escape(f"{log}: dropped its torn last line")):
        train(fresh(), make_data(), TC, out_dir=run4, tokenizer=toks[0])
    assert [r["loss"] for r in log_of(run4)] == full


def test_a_bad_line_inside_the_log_is_an_error_naming_file_and_line(run4, toks):
    log = run4 / "warmup.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = lines[1][:20]
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{log}, line 2: not a log record")):
        train(fresh(), make_data(), TC, out_dir=run4, tokenizer=toks[0])


def test_a_checkpoint_is_verified_before_it_replaces_the_older_ones(run4, toks, monkeypatch):
    real = T.atomic_write_text

    def lossy_disk(path, text):  # the optimizer file loses its end after it was written
        real(path, text)
        if Path(path).name == "train_state.json":
            f = Path(path).parent / "optimizer.safetensors"
            f.write_bytes(f.read_bytes()[:-50])
    monkeypatch.setattr(T, "atomic_write_text", lossy_disk)
    with pytest.raises(ValueError, match=r"damaged: .*optimizer\.safetensors has"):
        train(fresh(), make_data(), TC, out_dir=run4, tokenizer=toks[0])
    assert (run4 / "latest").read_text() == "step-0000004"
    assert step_dirs(run4) == ["step-0000002", "step-0000004"]
    assert loads(run4 / "step-0000002") and loads(run4 / "step-0000004")


def test_a_diverged_run_stops_at_the_step_and_saves_nothing(tmp_path, toks):
    tc = TrainConfig(**{**TC.__dict__, "lr": 1e6, "steps": 20, "checkpoint_every": 1})
    model = fresh()
    with pytest.raises(ValueError, match=r"training diverged at warmup step \d+: (loss|grad_norm) = (nan|inf)"):
        train(model, make_data(), tc, out_dir=tmp_path, tokenizer=toks[0])
    assert step_dirs(tmp_path)  # it ran a few steps first
    for name in step_dirs(tmp_path):  # every checkpoint written holds finite weights
        load_checkpoint(tmp_path / name, fresh())


# ----------------------------------------------------------------------------------------------- model directories
def test_a_config_json_missing_a_field_does_not_take_the_default(tmp_path):
    save_pretrained(tiny_model(0, memories_per_chunk=1), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    del cfg["memories_per_chunk"]  # the default is 5
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="memories_per_chunk=1 in the weights, 5 in config.json"):
        load_pretrained(tmp_path / "m")
    # a missing field whose default is the saved value is no mismatch
    save_pretrained(tiny_model(0), tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())
    del cfg["memories_per_chunk"]
    (tmp_path / "d" / CONFIG_FILE).write_text(json.dumps(cfg))
    assert load_pretrained(tmp_path / "d")[0].cfg.memories_per_chunk == 5


def test_another_valid_tokenizer_is_refused(tmp_path, toks):
    save_pretrained(tiny_model(0), tmp_path / "m", toks[0])
    toks[1].save(tmp_path / "m" / TOKENIZER_FILE)
    with pytest.raises(ValueError, match="is not the tokenizer the weights .* were saved with"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / TOKENIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_pretrained(tmp_path / "m")


def test_non_finite_weights_are_never_written_or_loaded(tmp_path, toks):
    good = tiny_model(0)
    save_pretrained(good, tmp_path / "m", toks[0])
    bad = tiny_model(0)
    with torch.no_grad():
        bad.blocks[1].mlp.w_up.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save .*1 of \d+ weight tensors hold NaN or inf"):
        save_pretrained(bad, tmp_path / "m", toks[0])
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "m")[0](IDS).logits, good(IDS).logits)  # the old model stays
    # a NaN weights file written by something else
    weights = tmp_path / "m" / WEIGHTS_FILE
    sd = {k: v.clone() for k, v in good.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    sd["norm.weight"][0] = float("inf")
    save_file(sd, str(weights), metadata=C.weights_metadata(weights))
    with pytest.raises(ValueError, match="hold NaN or inf"):
        load_pretrained(tmp_path / "m")


def test_save_pretrained_will_not_replace_a_directory_of_other_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_pretrained(tiny_model(0), tmp_path / "m")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["notes.txt"]


MODEL_KILL_POINTS = {
    "after the weights": (C, "save_weights", after_call(1)),
    "after config.json": (Memory3Config, "to_json", after_call(1, lambda self, path=None: path is not None)),
    "after tokenizer.json": (Tokenizer, "save", after_call(1)),
    "after the swap, before cleanup": (C, "_swap_in", after_call(1)),
}


@pytest.mark.parametrize("point", list(MODEL_KILL_POINTS))
def test_a_kill_while_overwriting_a_model_directory_leaves_one_whole_model(tmp_path, toks, point):
    old, new = tiny_model(0), tiny_model(1)
    save_pretrained(old, tmp_path / "m", toks[0])
    code = killed_at(lambda: save_pretrained(new, tmp_path / "m", toks[1]), MODEL_KILL_POINTS[point])
    assert code == -signal.SIGKILL, f"the child was not killed at {point!r} (exit {code})"
    model, tok = load_pretrained(tmp_path / "m")
    which = new if point.startswith("after the swap") else old
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, which(IDS).logits)
    assert tok.fingerprint() == (toks[1] if which is new else toks[0]).fingerprint()
    save_pretrained(new, tmp_path / "m", toks[1])  # the next save cleans up the killed one's temporary directory
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_without_an_atomic_exchange_a_kill_between_the_renames_names_the_previous_model(tmp_path, toks, monkeypatch):
    monkeypatch.setattr(C, "_exchange", lambda a, b: False)  # a platform without renameat2
    old = tiny_model(0)
    save_pretrained(old, tmp_path / "m", toks[0])
    save_pretrained(tiny_model(1), tmp_path / "m", toks[1])
    assert load_pretrained(tmp_path / "m")[1].fingerprint() == toks[1].fingerprint()
    code = killed_at(lambda: save_pretrained(old, tmp_path / "m", toks[0]), (C.os, "rename", after_call(1)))
    assert code == -signal.SIGKILL
    aside = list(tmp_path.glob(".m.*.old"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"the previous model in {aside[0]}")):
        load_pretrained(tmp_path / "m")
    assert load_pretrained(aside[0])[1].fingerprint() == toks[1].fingerprint()


# ------------------------------------------------------------------------------------------ distributed checkpoints
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, without a group
def test_a_truncated_distributed_shard_is_refused_naming_it(tmp_path):
    from mini_m3.distributed import load_dist_checkpoint, save_dist_checkpoint
    model = fresh()
    ck = save_dist_checkpoint(tmp_path, model, T.make_optimizer(model, TC), 2, TC)
    assert latest_checkpoint(tmp_path) == ck
    shard = ck / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"__0_0\.distcp has \d+ bytes"):
        load_dist_checkpoint(ck, fresh(), T.make_optimizer(fresh(), TC))
    with pytest.raises(ValueError, match="latest checkpoint .* is damaged"):
        latest_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from test_cli_text import TRAIN_ARGS, run, write_corpus
    root = tmp_path_factory.mktemp("cli")
    texts = write_corpus(root / "texts")
    code, _, err = run(["train", "--text-dir", str(texts), "--out", str(root / "run"), *TRAIN_ARGS])
    assert code == 0, err
    return root, texts, run, TRAIN_ARGS


def test_cli_resume_with_another_text_dir_and_batch_size_is_refused(cli_run):
    from test_cli_text import write_corpus
    root, texts, run, args = cli_run
    other = write_corpus(root / "other", seed=1)
    log_before = (root / "run" / "warmup" / "warmup.jsonl").read_bytes()
    argv = ["train", "--text-dir", str(other), "--out", str(root / "run"), *args, "--batch-size", "4"]
    code, _, err = run(argv)
    assert code == 2, err
    assert "cannot resume from" in err and "batch_size=2 there, 4 now" in err and "training data differ" in err
    assert (root / "run" / "warmup" / "warmup.jsonl").read_bytes() == log_before
    # the original command still resumes (the finished run: nothing left to train)
    code, _, err = run(["train", "--text-dir", str(texts), "--out", str(root / "run"), *args])
    assert code == 0, err


def test_cli_training_that_diverges_fails_and_saves_no_model(cli_run):
    root, texts, run, args = cli_run
    code, out, err = run(["train", "--text-dir", str(texts), "--out", str(root / "nan"), *args, "--lr", "1e6"])
    assert code == 2 and "training diverged at" in err, out + err
    assert not (root / "nan" / "model").exists()


def test_fine_tuning_logs_drop_a_torn_last_line_too(tmp_path):
    """SFT/DPO resume through the same log preparation as pretraining (it used to raise a JSONDecodeError)."""
    from mini_m3.finetune import _prepare_log
    log = tmp_path / "sft.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="dropped its torn last line"):
        _prepare_log(tmp_path, "sft.jsonl", 2)
    assert log.read_text() == '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n'
