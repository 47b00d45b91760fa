"""Command line: `mini-m3 demo | train | build-bank | generate | evaluate | smoke | sft | dpo` (`python -m mini_m3`)."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from pathlib import Path

import torch

from .config import MEMORY_SELECTORS


def _number(kind: type, low: float, strict: bool, high: float = math.inf):
    """argparse `type=` for an int/float that must be finite, > low (strict) or >= low, and <= high: a bad value is
    one usage line (`argument --temperature: must be a finite number >= 0, got 'nan'`), not a traceback deep in a
    command."""
    what = (f"a number in [{low}, {high}]" if high < math.inf and not strict else
            f"{'an integer' if kind is int else 'a finite number'} {'>' if strict else '>='} {low}")

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and (v > low if strict else v >= low) and v <= high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v
    return parse


positive_int, non_negative_int = _number(int, 0, strict=True), _number(int, 0, strict=False)
positive_float, non_negative_float = _number(float, 0, strict=True), _number(float, 0, strict=False)
fraction = _number(float, 0, strict=False, high=1)  # a share in [0, 1]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (also picks the knowledge-base and held-out "
                                                         "documents of a --text-dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads for torch")


def _device(text: str) -> str:
    """argparse `type=` for --device: a device this machine can run on (`checkpoint.resolve_device`), else one
    usage line (`argument --device: cannot use 'cuda': CUDA is not available ...`)."""
    from .checkpoint import resolve_device
    try:
        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_device_flags(p: argparse.ArgumentParser, dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16"),
                      dtype_help: str = "", device_default: str | None = "cpu", device_help: str = "") -> None:
    """--device and --dtype of `train`, `build-bank`, `generate` and `evaluate`."""
    p.add_argument("--device", type=_device, default=device_default,
                   help="where the model runs: cpu, cuda, cuda:N or mps" + device_help)
    p.add_argument("--dtype", default="float32", choices=dtypes,
                   help="compute precision: bfloat16/float16 run under torch.autocast (weights stay float32, so "
                        "models and banks are the same files)" + dtype_help)


def _add_split_flags(p: argparse.ArgumentParser) -> None:
    """The document splits of a --text-dir: `train`, `build-bank` and `evaluate` must be given the same values."""
    p.add_argument("--reference-fraction", type=fraction, default=0.5,
                   help="share of the kept (not held-out) documents that form the knowledge base (by a hash of "
                        "the document id and --seed)")
    p.add_argument("--heldout-fraction", type=fraction, default=0.1,
                   help="share of the kept documents held out for evaluation (by a hash of the document id and "
                        "--seed): never seen by the tokenizer or the training text")


SHOW_DROPPED = 50  # dropped documents printed by name; report.json names all of them


def _print_pipeline(report) -> None:
    """The §4 pipeline's table, then every file it skipped and every document it dropped, by name."""
    print(report.table())
    for s in report.skipped_files:  # bad files are skipped, not fatal; name them, not just count them
        print(f"skipped {s['path']}: {s['reason']}")
    for d in report.dropped_documents[:SHOW_DROPPED]:
        print(f"dropped {d['doc_id']}: {d['reason']}")
    if len(report.dropped_documents) > SHOW_DROPPED:
        print(f"... and {len(report.dropped_documents) - SHOW_DROPPED} more dropped documents: all of them are "
              f"named in {report.files.get('report', 'report.json')}")
    st = report.settings
    print(f"knowledge base: {report.reference_documents} documents (--reference-fraction "
          f"{st['reference_fraction']}); held out: {report.heldout_documents} documents (--heldout-fraction "
          f"{st['heldout_fraction']}), {report.heldout_references} of their references in the knowledge base")


ALLTOKEN_DEMO_OPTIONS = ("preset", "warmup_steps", "continual_steps", "selector", "tokens_per_head")


def cmd_demo(a) -> int:
    from .demo import DemoSettings, paper_demo_settings, run_alltoken_demo, run_demo
    given = [k for k in ALLTOKEN_DEMO_OPTIONS if getattr(a, k) is not None]
    if a.all_tokens:
        kw = dict(seed=a.seed, threads=a.threads, **{k: getattr(a, k) for k in given})
        s = DemoSettings.quick(**kw) if a.quick else DemoSettings(**kw)
        run_alltoken_demo(a.out, s, progress=not a.quiet)
    else:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} sets the all-token demo: add --all-tokens (the default "
                             f"demo runs the paper's format with its chain fixed)")
        s = paper_demo_settings(a.seed, threads=a.threads, quick=a.quick, progress=not a.quiet,
                                flagship="" if a.flagship == "none" else a.flagship)
        run_demo(a.out, s, argv=["mini-m3", *a.argv])
    print(f"results written to {Path(a.out) / 'results.json'} and results.png")
    return 0


def cmd_flagship(a) -> int:
    from .reading import flagship_settings, run_reading
    s = flagship_settings(a.seed, threads=a.threads, quick=a.quick, progress=not a.quiet, wordings=a.wordings)
    run_reading(a.out, s, argv=["mini-m3", *a.argv])
    print(f"results written to {Path(a.out) / 'results.json'}; the model in {Path(a.out) / 'model'}")
    return 0


def cmd_smoke(a) -> int:
    """Build the tiny model, encode two references, generate a few tokens reading them."""
    import tempfile

    from . import Memory3, Memory3Config, Tokenizer, generate
    from .memory.bank import MemoryBank
    torch.manual_seed(a.seed)
    refs = ["Ada Lovelace was born in London in 1815 and wrote the first program.",
            "Alan Turing was born in London in 1912 and studied at Cambridge."]
    tok = Tokenizer.train(refs * 50, 300)
    model = Memory3(Memory3Config.from_name("tiny")).eval()
    with tempfile.TemporaryDirectory() as d:
        bank = MemoryBank.build(Path(d) / "bank", model, tok, refs, progress=False)
        out = generate(model, tok, "Where was Ada Lovelace born?", bank=bank, max_new_tokens=8)
    print(f"tiny model: {model.num_parameters():,} non-embedding parameters; references used: {out.references}")
    print(f"generated (untrained, so noise): {out.text!r}")
    return 0


def _load_text_corpus(a, out: Path, reference_length: int):
    from .data.pipeline import read_references, run_pipeline, load_train_tokens
    from .tokenizer import Tokenizer
    data_dir = out / "data"
    report = run_pipeline(a.text_dir, data_dir, vocab_size=a.vocab_size, seed=a.seed, progress=not a.quiet,
                          reference_fraction=a.reference_fraction, heldout_fraction=a.heldout_fraction,
                          reference_length=reference_length)
    _print_pipeline(report)
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    refs = list(read_references(data_dir))
    if not refs:
        raise ValueError(f"no knowledge-base references: none of the {report.kept} kept documents of {a.text_dir} "
                         f"fell in the knowledge-base subset; add more text")
    return tok, [r["text"] for r in refs], [r["token_ids"] for r in refs], load_train_tokens(data_dir)


SHARDED_FLAGS = ("--bf16", "--meta-init", "--micro-batch", "--stop-at")  # `train` flags that need several processes
ONE_PROCESS_FLAGS = ("--eval-every", "--control")  # `train` flags refused under torchrun


def cmd_train(a) -> int:
    """Two-stage pretraining; under torchrun (WORLD_SIZE > 1) the model is sharded with FSDP2 (distributed.py)."""
    from .distributed import world_info
    world = world_info()[1]
    _check_train_flags(a, world)
    torch.set_num_threads(a.threads)
    return _train_sharded(a, Path(a.out)) if world > 1 else _train_one_process(a, Path(a.out))


def _check_train_flags(a, world: int) -> None:
    """Refuse, in one line, the `train` flags that do not apply to one process (world == 1) or to torchrun."""
    if world == 1:
        wrong = [f for f in SHARDED_FLAGS if getattr(a, f[2:].replace("-", "_"))]
        why = "only under torchrun with --nproc_per_node >= 2 (FSDP2 sharding); this is one process"
    else:
        wrong = [f for f in ONE_PROCESS_FLAGS if getattr(a, f[2:].replace("-", "_"))]
        wrong += [f"--dtype {a.dtype}"] if a.dtype != "float32" else []
        why = "only in one process, not under torchrun" + (" (use --bf16)" if a.dtype != "float32" else "")
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: {why}")
    if world == 1 and a.eval_every and not a.text_dir:
        raise ValueError("--eval-every needs --text-dir: it logs the loss of the held-out documents")
    if world > 1 and a.device and torch.device(a.device).type not in ("cpu", "cuda"):
        raise ValueError(f"--device {a.device}: under torchrun the ranks run on cpu (gloo) or cuda (NCCL)")


def model_config(a, tokenizer=None):
    """`train`'s model config: the --preset with the --set overrides; the vocabulary is --vocab-size with --text-dir
    (the tokenizer's if that is larger), the tokenizer's with --world/--data (the paper's presets keep theirs).
    A bad preset or override, or sequences longer than the model's context, fail here, before anything slow."""
    from .config import Memory3Config, parse_overrides
    over = parse_overrides(a.set)
    if a.text_dir:
        cfg = Memory3Config.from_name(a.preset, **{"vocab_size": a.vocab_size, **over})
        other_vocab = tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size  # never index past the table
    else:
        cfg = Memory3Config.from_name(a.preset, **over)
        other_vocab = (tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size
                       and not a.preset.startswith(("paper", "fig10")))
    if other_vocab:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    T = cfg.chunk_length * a.chunks_per_sequence
    if not a.data and T > cfg.max_seq_len:
        raise ValueError(f"--chunks-per-sequence {a.chunks_per_sequence} x {cfg.chunk_length} tokens = {T} does not "
                         f"fit preset {a.preset!r} (max_seq_len={cfg.max_seq_len}); use at most "
                         f"{cfg.max_seq_len // cfg.chunk_length}")
    return cfg


def _train_fields(a) -> dict:
    """The TrainConfig fields that every stage of `train`, and its no-memory control, share."""
    return dict(batch_size=a.batch_size, lr=a.lr, seed=a.seed, checkpoint_every=a.checkpoint_every, quiet=a.quiet,
                threads=a.threads, eval_every=a.eval_every, device=a.device, dtype=a.dtype)


def stage_configs(a) -> list:
    """The TrainConfig of each stage of `train` (none when both step counts are 0: the untrained model is saved)."""
    import dataclasses

    from .train import TrainConfig, stage_lr_warmup, two_stage_configs
    if not a.warmup_steps + a.continual_steps:
        return []
    # Not `two_stage_configs`' single schedule but two separately scheduled stages, as §5's continual training (which
    # may have its own peak, --continual-lr): the LR warms up over 10 % of the warmup stage only (none without one)
    # and decays over the last 10 % of the last stage. Checkpoints of earlier runs resume only on this schedule.
    warm, cont = two_stage_configs(a.warmup_steps, a.continual_steps,
                                   lr_warmup=stage_lr_warmup(a.warmup_steps),
                                   last_decay_fraction=TrainConfig.decay_fraction, **_train_fields(a))
    if cont is not None and a.continual_lr:
        cont = dataclasses.replace(cont, lr=a.continual_lr)
    return [tc for tc in (warm, cont) if tc is not None]


def _new_model(a, cfg, meta: bool = False):
    """A fresh model seeded by --seed. With --text-dir drawn as `train --text-dir` always has (torch's global
    generator), otherwise by `distributed.build_model` (a generator of its own; meta=True allocates nothing and
    `shard_model` draws the same weights shard by shard)."""
    from .distributed import build_model
    from .model import Memory3
    if a.text_dir and not meta:
        torch.manual_seed(a.seed)
        return Memory3(cfg)
    return build_model(cfg, a.seed, meta=meta)


def _text_dir_data(a, out: Path, cfg):
    """--text-dir: the §4 pipeline into OUT/data, then its training text as (n, T) sequences, each chunk with its
    retrieved reference. Returns (cfg with the tokenizer's vocabulary, tokenizer, data, chunked), where `chunked`
    lays out any token stream the same way (the held-out loss of --eval-every reads it)."""
    from .memory.retrieve import Retriever
    from .train import ChunkedData, retrieve_for_chunks
    T = cfg.chunk_length * a.chunks_per_sequence
    tok, ref_texts, ref_tokens, stream = _load_text_corpus(a, out, cfg.reference_length)
    cfg = model_config(a, tok)
    retriever = Retriever().fit(ref_texts)

    def chunked(stream):
        """A token stream as (n, T) sequences with each chunk's retrieved reference; None if under one sequence."""
        n = (len(stream) - 1) // T
        if n < 1:
            return None
        s = torch.as_tensor(stream[:n * T + 1].astype("int64"))
        tokens = s[:-1].view(n, T)
        refs = retrieve_for_chunks(tokens, cfg.chunk_length, tok, retriever, ref_tokens, progress=not a.quiet)
        return ChunkedData(tokens, s[1:].view(n, T), refs, ref_tokens)

    data = chunked(stream)
    if data is None:
        raise ValueError(f"the corpus has {len(stream)} training tokens, fewer than one sequence of {T}")
    return cfg, tok, data, chunked


def _chunked_data(a, out: Path, rank: int = 0):
    """The training data as a `distributed.save_chunked_data` folder, read back by every rank: --data DIR as given;
    --world N built by rank 0 into OUT/data once (a later run reuses it); --text-dir (under torchrun) the §4 pipeline's
    sequences written into OUT/data by rank 0. Returns (model config, tokenizer, data)."""
    from .distributed import barrier, load_chunked_data, prepare_world_data, save_chunked_data
    cfg = model_config(a)
    data_dir = Path(a.data) if a.data else out / "data"
    if rank == 0 and a.text_dir:
        _, tok, data, _ = _text_dir_data(a, out, cfg)
        save_chunked_data(data, data_dir, tok)
    elif rank == 0 and a.world and not (data_dir / "data.safetensors").exists():
        prepare_world_data(data_dir, a.world, preset=a.preset, chunks_per_sequence=a.chunks_per_sequence,
                           vocab_size=a.vocab_size, seed=a.seed, progress=not a.quiet, chunk_length=cfg.chunk_length)
    barrier()
    data, tok = load_chunked_data(data_dir)
    cfg = model_config(a, tok)
    if data.tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{data_dir}: sequences of {data.tokens.shape[1]} tokens do not fit preset {a.preset!r} "
                         f"(max_seq_len={cfg.max_seq_len}); pass --set max_seq_len={data.tokens.shape[1]}")
    return cfg, tok, data


def _train_one_process(a, out: Path) -> int:
    """`train` in one process: `train.train` runs each stage (and, with --control, the no-memory control)."""
    from .checkpoint import save_pretrained
    from .train import plot_losses, train, two_stage_configs
    eval_fn = None
    if a.text_dir:
        cfg, tok, data, chunked = _text_dir_data(a, out, model_config(a))
        eval_fn = _heldout_logger(a, out, tok, chunked, data.tokens.shape[1])
    else:
        cfg, tok, data = _chunked_data(a, out)

    def run_stages(model, configs, log_dir: Path, best_name: str, model_name: str) -> None:
        keep = _best_keeper(out, best_name, tok, eval_fn, [log_dir / tc.stage for tc in configs])
        for tc in configs:
            r = train(model, data, tc, out_dir=log_dir / tc.stage, tokenizer=tok, resume=not a.no_resume,
                      eval_fn=keep and keep(tc.stage))
            label = tc.stage if log_dir == out else f"{log_dir.name}/{tc.stage}"
            print(f"{label}: final loss {r['final_loss']}, median step {r['step_time']}s")
        if not a.no_save_model:
            save_pretrained(model, out / model_name, tok)

    run_stages(_new_model(a, cfg), stage_configs(a), out, "best_model", "model")
    logs = [p for p in (out / "warmup/warmup.jsonl", out / "continual/continual.jsonl") if p.exists()]
    if a.control:  # the no-memory control: the same tokens and steps, all of them without memory
        total = a.warmup_steps + a.continual_steps
        run_stages(_new_model(a, cfg), [two_stage_configs(total, 0, **_train_fields(a))[0]] if total else [],
                   out / "control", "control_best_model", "control_model")
        logs += [p for p in (out / "control/warmup/warmup.jsonl",) if p.exists()]
        if not a.no_save_model:
            print(f"no-memory control saved to {out / 'control_model'}")
    plot_losses(logs, out / "loss.png", labels=[str(p.relative_to(out).parent) for p in logs])
    if eval_fn is not None and (out / BEST_FILE).exists():
        kept = ", ".join(str(out / n) for n in ("best_model", "control_best_model") if (out / n).is_dir())
        print(f"lowest held-out loss: {kept} (see {out / BEST_FILE})")
    saved = "no model saved (--no-save-model)" if a.no_save_model else f"model saved to {out / 'model'}"
    print(saved + (f"; held-out documents in {out / 'data' / 'heldout.jsonl'} (mini-m3 evaluate --model "
                   f"{out / 'model'} --bank BANK --text-dir {out / 'data'})" if a.text_dir else ""))
    return 0


def _train_sharded(a, out: Path) -> int:
    """`train` under torchrun: the model sharded with FSDP2, every rank a slice of each global batch
    (`distributed.train_distributed`: the single-process run's losses and updates); the full model is gathered into
    OUT/model at the end."""
    import torch.distributed as dist

    from .distributed import gather_and_save, init_distributed, shard_model, train_distributed, world_info
    rank, world, _ = world_info()
    owns_group = not dist.is_initialized()  # a caller that started the group keeps it
    device = init_distributed(torch.device(a.device).type if a.device else None)
    cfg, tok, data = _chunked_data(a, out, rank)
    bf16 = (device.type == "cuda") if a.bf16 is None else a.bf16
    model = shard_model(_new_model(a, cfg, meta=a.meta_init), device, bf16=bf16, seed=a.seed)
    if rank == 0 and not a.quiet:
        print(f"{world} ranks on {device.type}, {cfg.name}: {sum(p.numel() for p in model.parameters()):,} "
              f"parameters, bf16={bf16}", flush=True)
    for tc in stage_configs(a):
        stop = a.stop_at if tc.stage == "continual" else None
        r = train_distributed(model, data, tc, out_dir=out / tc.stage, tokenizer=tok, resume=not a.no_resume,
                              stop_at=stop, micro_batch=a.micro_batch)
        if rank == 0:
            print(f"{tc.stage}: final loss {r['final_loss']}, median step {r['step_time']}s", flush=True)
        if stop is not None and stop < tc.steps:
            break
    else:
        if not a.no_save_model:
            gather_and_save(model, out / "model", tok)
            if rank == 0:
                print(f"model saved to {out / 'model'}", flush=True)
    if owns_group:
        # The sharded model's device mesh holds the process group, which destroy_process_group does not free: drop
        # it first, so gloo's threads end here and not during interpreter shutdown (a rare SIGABRT at exit there).
        del model
        gc.collect()
        dist.destroy_process_group()
    return 0


def _heldout_logger(a, out: Path, tok, chunked, T: int):
    """`train --eval-every N`: a `train` eval_fn giving the held-out loss with and without memory (the held-out
    documents laid out as the training text), or None when not asked for or the held-out text is too short."""
    import numpy as np

    from .data.pipeline import read_heldout
    from .train import TrainConfig, evaluate_loss
    if not a.eval_every:
        return None
    docs = read_heldout(out / "data")
    stream = np.asarray([t for d in docs for t in [tok.bos_id] + tok.encode(d["text"]) + [tok.eos_id]], np.int64)
    eval_data = chunked(stream)
    if eval_data is None:
        print(f"--eval-every: the {len(docs)} held-out documents hold {len(stream)} tokens, fewer than one "
              f"sequence of {T}: no held-out loss is logged (raise --heldout-fraction)")
        return None
    cfg = TrainConfig(batch_size=a.batch_size, dtype=a.dtype)

    def losses(model, step: int) -> dict:
        return {f"heldout_loss_{name}": evaluate_loss(model, eval_data, cfg, with_memory=name == "memory")
                for name in ("memory", "none")}
    return losses


BEST_FILE = "best.json"


def _read_best(path: Path) -> dict:
    """OUT/best.json: {model directory name: its record}; {} when absent. A damaged file is a clear error."""
    if not path.exists():
        return {}
    from .config import parse_json
    try:
        records = parse_json(path.read_text(encoding="utf-8"), str(path))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{e}: move it aside to start the best-model record afresh") from None
    if not isinstance(records, dict):
        raise ValueError(f"{path}: expected a JSON object of best-model records, got {type(records).__name__}")
    for name, r in records.items():
        loss = r.get("loss") if isinstance(r, dict) else None
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
            raise ValueError(f"{path}: record {name!r} has no finite 'loss': move the file aside to start afresh")
    return records


def _best_keeper(out: Path, name: str, tok, eval_fn, stage_dirs: list[Path]):
    """`train --eval-every`: wrap the held-out eval_fn so that the run's best model is kept in OUT/<name>.

    A model is judged by the held-out loss of the way it is trained: without memory in the warmup stage (and the
    no-memory control), with memory in the continual stage. The best is the lowest judged loss over all the run's
    evaluations, both stages together; each new best is saved (save_pretrained, then OUT/best.json's record
    <name>: stage, step, judged_by, loss and both held-out losses). A resumed run (a checkpoint in one of
    `stage_dirs`) starts from the recorded best and only replaces it with a lower loss; a fresh run ignores an
    older run's record. Returns stage -> eval_fn, or None without an eval_fn."""
    from .checkpoint import save_pretrained
    from .train import checkpoint_dirs
    from .utils import atomic_write_text
    if eval_fn is None:
        return None
    path = out / BEST_FILE
    records = _read_best(path)  # checked before training, not after its first evaluation
    resumed = any(d.is_dir() and checkpoint_dirs(d) for d in stage_dirs)
    best = records.get(name) if resumed else None

    def for_stage(stage: str):
        judged = "heldout_loss_memory" if stage == "continual" else "heldout_loss_none"

        def keep_best(model, step: int) -> dict:
            nonlocal best
            losses = eval_fn(model, step)
            loss = losses[judged]
            if math.isfinite(loss) and (best is None or loss < best["loss"]):
                save_pretrained(model, out / name, tok)  # the model first: a kill before the record is redone
                best = dict(stage=stage, step=step, judged_by=judged, loss=loss, **losses)
                on_file = _read_best(path)
                on_file[name] = best
                atomic_write_text(path, json.dumps(on_file, indent=1))
            return losses
        return keep_best
    return for_stage


def cmd_build_bank(a) -> int:
    from .checkpoint import autocast_to, load_pretrained
    from .memory.bank import MemoryBank
    torch.set_num_threads(a.threads)
    model, tok = load_pretrained(a.model, map_location=a.device)
    if tok is None:
        raise ValueError(f"{a.model} has no tokenizer.json")
    if a.text_dir:
        from .data.pipeline import read_references, run_pipeline
        data_dir = _pipeline_dir(a.out)
        # same seed as `train` -> the same knowledge-base subset of the documents
        report = run_pipeline(a.text_dir, data_dir, tokenizer=tok, seed=a.seed, progress=not a.quiet,
                              reference_fraction=a.reference_fraction, heldout_fraction=a.heldout_fraction,
                              heldout_references=a.heldout_references, reference_length=model.cfg.reference_length)
        _print_pipeline(report)
        limit = model.cfg.reference_length

        def fit(text: str) -> list[str]:
            # The bank stores texts and re-tokenizes them. A reference is an exact <=128-token chunk, but its
            # decoded text can re-tokenize longer (a character cut by the chunk boundary decodes to U+FFFD,
            # 3 bytes; a word cut mid-way merges differently), and the bank refuses > reference_length. Halve
            # such a text at the space nearest its middle (at the middle character if it has none) until
            # every piece fits: no text is lost and no new character is cut.
            if not text.strip():
                return []
            if len(tok.encode_reference(text)) <= limit:
                return [text]
            mid = len(text) // 2
            left, right = text.rfind(" ", 0, mid), text.find(" ", mid)
            cut = min((c for c in (left, right) if c > 0), key=lambda c: abs(c - mid), default=mid)
            return fit(text[:cut]) + fit(text[cut:])

        refs = [r["text"] for r in read_references(data_dir)]
        texts = [piece for t in refs for piece in fit(t)]
        if len(texts) != len(refs):
            print(f"{len(refs)} references -> {len(texts)} bank texts (over-long decoded texts split to fit "
                  f"{limit} tokens)")
    else:
        texts = _read_references_jsonl(a.references)
    with autocast_to(a.device, a.dtype):  # the weights stay float32: the bank is for the model on disk
        bank = MemoryBank.build(a.out, model, tok, texts, quantizer=a.vq, overwrite=a.overwrite,  # the model's format
                                progress=not a.quiet, seed=a.seed)
    fmt = model.cfg.memory_format
    print(f"bank of {len(bank)} references at {a.out}: {bank.bytes_per_memory()} bytes per memory; memory format of "
          f"the model: selector {fmt['selector']!r}, tokens per head {fmt['tokens_per_head']}")
    return 0


def _pipeline_dir(out) -> Path:
    """Where `build-bank --text-dir` puts the §4 pipeline's outputs: OUT.data beside the bank (appended, never
    substituted: `--out X.data` must not make the bank its own pipeline folder)."""
    out = Path(os.path.abspath(out))  # "bank/", "." and ".." name a folder too
    return out.with_name(out.name + ".data")


def _read_references_jsonl(path) -> list[str]:
    """The 'text' of every non-empty line of a JSONL file; a bad line is a ValueError naming file:line."""
    from .config import iter_jsonl
    texts = []
    for n, obj in iter_jsonl(path):  # OSError (missing, a directory, no permission) names the path
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{n}: expected a JSON object with a string field 'text'")
        texts.append(obj["text"])
    if not texts:
        raise ValueError(f"{path} holds no references (one JSON object with a 'text' field per line)")
    return texts


def cmd_generate(a) -> int:
    from .checkpoint import autocast_to, load_pretrained
    from .inference import generate
    from .memory.bank import MemoryBank
    torch.set_num_threads(a.threads)
    model, tok = load_pretrained(a.model, map_location=a.device)
    bank = MemoryBank.open(a.bank, model, tok) if a.bank else None
    with autocast_to(a.device, a.dtype):
        r = generate(model, tok, a.prompt, bank=bank, mode=a.mode, max_new_tokens=a.max_new_tokens,
                     temperature=a.temperature, seed=a.seed)
    print(r.text)
    if r.references:
        print(f"# references per chunk: {r.references}", file=sys.stderr)
    return 0


def cmd_evaluate(a) -> int:
    from .checkpoint import autocast_to
    with autocast_to(a.device, a.dtype):
        return _evaluate(a)


def _evaluate(a) -> int:
    from .checkpoint import load_pretrained
    from .data.world import World
    from .evaluate import qa_eval
    from .memory.bank import MemoryBank
    torch.set_num_threads(a.threads)
    questions = None
    if a.qa:  # the file first: a bad line is reported before anything slow runs
        from .evaluate import read_qa_jsonl
        if not a.bank:
            raise ValueError("evaluate --qa needs --bank (a bank built by --model, e.g. build-bank --references)")
        questions = read_qa_jsonl(a.qa)
    model, tok = load_pretrained(a.model, map_location=a.device)
    if tok is None:
        raise ValueError(f"{a.model} has no tokenizer.json")
    bank = MemoryBank.open(a.bank, model, tok) if a.bank else None
    if questions is not None:
        return _evaluate_user_qa(a, model, tok, bank, questions)
    if a.text_dir:
        return _evaluate_heldout(a, model, tok, bank)
    world = World.generate(a.n_people, seed=a.seed)
    _refuse_foreign_tokenizer(a.model, tok, world)
    items = world.eval_questions(a.split, a.n, seed=a.seed)
    r = qa_eval(model, tok, items, mode=a.mode, bank=bank, progress=not a.quiet)
    print(json.dumps({k: v for k, v in r.items() if k not in ("correct", "pieces", "logliks", "retrieved")}, indent=1))
    return 0


WORLD_TOKENS_PER_WORD = 3.0  # a world tokenizer needs ~1.2 per word at the demo's vocabulary; an English one ~3.9


def _refuse_foreign_tokenizer(model_dir, tok, world) -> None:
    """World QA on a model that never saw the world would print accuracy 0.0 as if it were a result. Refuse a model
    that `train --text-dir` made (its OUT/data/report.json records the model's tokenizer); warn when the tokenizer
    cuts the world's biographies into more than WORLD_TOKENS_PER_WORD tokens per word (a sign, not a proof: a world
    tokenizer with a very small vocabulary does too)."""
    report = Path(model_dir).parent / "data" / "report.json"
    if report.is_file():
        try:
            fp = json.loads(report.read_text(encoding="utf-8"))["settings"]["tokenizer_fingerprint"]
        except (ValueError, KeyError, TypeError):
            fp = None
        if fp == tok.fingerprint():
            raise ValueError(f"{model_dir} was trained by `train --text-dir` ({report}), not on the knowledge "
                             f"world: its world QA accuracy would mean nothing; for one's own corpus use "
                             f"--text-dir (held-out documents)")
    words = [w for t in world.references()[:200] for w in t.split()]
    per_word = sum(len(tok.encode(" " + w)) for w in words) / max(1, len(words))
    if per_word > WORLD_TOKENS_PER_WORD:
        print(f"warning: the tokenizer of {model_dir} needs {per_word:.1f} tokens per word of the world's "
              f"biographies (> {WORLD_TOKENS_PER_WORD}): was the model trained on the knowledge world "
              f"(--n-people/--seed as in the demo)?", file=sys.stderr)


def _heldout_documents(a, tok) -> tuple[list[dict], Path]:
    """The held-out documents of --text-dir: a pipeline folder (heldout.jsonl), a `train` OUT folder
    (OUT/data/heldout.jsonl), or a folder of .txt files split again with --seed/--heldout-fraction."""
    import tempfile

    from .data.pipeline import read_heldout, run_pipeline
    root = Path(a.text_dir)
    for d in (root, root / "data"):
        if (d / "report.json").is_file() and (d / "tokenizer.json").is_file():  # a pipeline folder
            return read_heldout(d), d
    with tempfile.TemporaryDirectory() as tmp:
        report = run_pipeline(root, tmp, tokenizer=tok, seed=a.seed, progress=not a.quiet,
                              reference_fraction=a.reference_fraction, heldout_fraction=a.heldout_fraction)
        print(f"{report.heldout_documents} of the {report.kept} kept documents of {root} held out "
              f"(--heldout-fraction {a.heldout_fraction}, --seed {a.seed})")
        return read_heldout(tmp), root


def _evaluate_user_qa(a, model, tok, bank, questions) -> int:
    """`evaluate --qa`: the user's questions with memory, memory off and RAG; result JSON and a table."""
    from .evaluate import user_qa_eval
    from .provenance import provenance
    from .utils import atomic_write_text
    r = user_qa_eval(model, tok, bank, questions, progress=not a.quiet)
    argv = ["mini-m3", *a.argv]
    result = {**r, "model": str(a.model), "bank": str(a.bank), "qa": str(a.qa), "argv": argv,
              "provenance": provenance(a.seed, argv=argv)}
    out = Path(a.out or "qa_eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    fmt = r["memory_settings"]
    print(f"{'mode':<12}{'exact match':>12}")
    for mode, v in r["exact_match"].items():
        print(f"{mode:<12}{v:>12.3f}")
    print(f"{r['n']} questions; retrieval top-1 {r['retrieval_top1']:.3f} ({r['retrieval_top1_definition']}); "
          f"memory format of the model: selector {fmt['selector']!r}, tokens per head {fmt['tokens_per_head']}, "
          f"memories per chunk {fmt['memories_per_chunk']}; results in {out}")
    return 0


def _evaluate_heldout(a, model, tok, bank) -> int:
    """`evaluate --text-dir`: held-out loss and perplexity with memory, without, RAG and the control (JSON + PNG)."""
    from .checkpoint import load_pretrained
    from .evaluate import heldout_lm_eval, plot_heldout
    from .memory.overlap import EVAL_LEAKAGE_THRESHOLD
    from .utils import atomic_write_text
    if bank is None:
        raise ValueError("evaluate --text-dir needs --bank (a bank built by --model, e.g. build-bank --text-dir)")
    docs, source = _heldout_documents(a, tok)
    if not docs:
        raise ValueError(f"no held-out documents in {source}: train with --heldout-fraction > 0")
    bank_holds_heldout = None  # unknown for a bank built from --references
    bank_report = _pipeline_dir(a.bank) / "report.json"
    if bank_report.is_file():
        from .data.pipeline import read_heldout
        from .config import parse_json
        settings = parse_json(bank_report.read_text(encoding="utf-8"), str(bank_report))
        if not isinstance(settings, dict) or not isinstance(settings.get("settings"), dict):
            raise ValueError(f"{bank_report}: not a pipeline report (no 'settings' object)")
        bank_holds_heldout = bool(settings["settings"].get("heldout_references"))
        bank_heldout = {d["doc_id"] for d in read_heldout(_pipeline_dir(a.bank))}
        if bank_heldout != {d["doc_id"] for d in docs}:
            raise ValueError(f"the bank at {a.bank} was built with another held-out split ({len(bank_heldout)} "
                             f"documents, {len(docs)} here): pass build-bank the same --seed and --heldout-fraction")
    control = None
    if a.control_model:
        control, ctok = load_pretrained(a.control_model, map_location=a.device)
        if ctok is None or ctok.fingerprint() != tok.fingerprint():
            raise ValueError(f"the control model {a.control_model} does not use the tokenizer of {a.model}: "
                             f"their losses would not be comparable")
    r = heldout_lm_eval(model, tok, docs, bank=bank, control=control,
                        leakage_threshold=None if a.no_leakage_filter else EVAL_LEAKAGE_THRESHOLD,
                        progress=not a.quiet)
    result = {"model": str(a.model), "bank": str(a.bank), "control_model": a.control_model,
              "heldout_source": str(source), "heldout_documents": len(docs),
              "bank_holds_heldout_references": bank_holds_heldout, **r}
    out = Path(a.out or "heldout_eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    plot_heldout(r, out.with_suffix(".png"))
    for mode, v in r["overall"].items():
        print(f"{mode:>8}: loss {v['loss']:.4f}, perplexity {v['perplexity']:.2f} ({v['tokens']} tokens)")
    rt = r["retrieval"]
    print(f"{len(docs)} held-out documents; bank holds their references: {bank_holds_heldout}; leakage filter "
          f"{rt['leakage_threshold']} removed {rt['references_removed_by_leakage_filter']} references; "
          f"results in {out} and {out.with_suffix('.png')}")
    return 0


def _finetune_inputs(a):
    """Model, tokenizer, world, bank and reading run (None) for `sft` / `dpo` (the bank must hold this world's
    biographies). A reading run's model (a `reading_run.json` or a run's results.json beside it: the flagship) brings
    its own world; without --bank its bank is built in OUT/bank_in. Otherwise the first world, from --n-people
    --seed."""
    from .checkpoint import load_pretrained
    from .data.world import World
    from .memory.bank import MemoryBank
    from .reading import is_reading_run, load_reading_run
    torch.set_num_threads(a.threads)
    model_dir = Path(a.model)
    run = None
    if is_reading_run(model_dir):
        run = load_reading_run(model_dir)  # the world regenerated from the run's settings and checked
        model, tok, world, texts = run.model, run.tokenizer, run.world, run.references
        how = f"the reading run at {a.model}"
    else:
        model, tok = load_pretrained(a.model)
        if tok is None:
            raise ValueError(f"{a.model} has no tokenizer.json")
        world = World.generate(a.n_people, seed=a.seed)
        texts = world.references()
        how = f"the world generated with --n-people {a.n_people} --seed {a.seed}; pass the values the demo used"
    bank = None
    if a.bank:
        bank = MemoryBank.open(a.bank, model, tok)  # refuses a bank written by other weights (Remark 9)
        if list(bank.texts) != texts:
            raise ValueError(f"the bank at {a.bank} does not hold the biographies of {how}")
    elif not a.no_memory:
        if run is None:
            raise ValueError("fine-tuning with memory needs --bank DIR (a bank built by --model); or pass "
                             "--no-memory")
        print(f"building the bank of {a.model} (every person of its world) in {Path(a.out) / 'bank_in'}")
        bank = run.build_bank(Path(a.out) / "bank_in", progress=not a.quiet)
    return model, tok, world, bank, run


def _finetune_outputs(a, kind: str, model, tok, world, bank, result: dict, cfg, run=None) -> int:
    """Save OUT/model (with the reading run's settings file, if it came from one, so that it loads with its
    world), a cold-start OUT/bank for the tuned weights, the probe and OUT/summary.json."""
    import dataclasses

    from .checkpoint import save_pretrained
    from .config import atomic_write_text
    from .finetune import bank_for_model, factuality_probe
    from .reading import texts_sha256, write_reading_run
    out = Path(a.out)
    save_pretrained(model, out / "model", tok)
    if run is not None:
        write_reading_run(out / "model", run.settings, texts_sha256(run.references), tuned_from=str(a.model),
                          tuning=kind)
    new_bank = bank_for_model(model, tok, bank, out / "bank") if bank is not None else None
    summary = {"kind": kind, "config": dataclasses.asdict(cfg), "seed": a.seed, "data_seed": a.data_seed,
               "n_people": a.n_people, "model_in": str(a.model), "bank_in": a.bank,
               **{k: v for k, v in result.items() if k != "retrieved"}}
    if a.probe_questions:
        modes = ("memory", "none") if new_bank is not None else ("none",)
        probe = factuality_probe(model, tok, world, bank=new_bank, modes=modes, n_known=a.probe_questions,
                                 n_unknown=a.probe_questions, seed=a.data_seed)
        summary["probe"] = probe
        for m in modes:
            k, u = probe[m]["known"], probe[m]["unknown"]
            print(f"probe ({m}): held-out people accuracy {k['accuracy']:.3f}; non-existent people: made-up "
                  f"{u['made_up_rate']:.3f}, abstain {u['abstain_rate']:.3f}")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(f"{kind}: final loss {result['final_loss']}; model saved to {out / 'model'}"
          + (f", bank for it at {out / 'bank'}" if new_bank is not None else ""))
    return 0


def cmd_sft(a) -> int:
    from .data.instructions import sft_examples
    from .finetune import SFTConfig, sft
    model, tok, world, bank, run = _finetune_inputs(a)
    kw = {k: v for k, v in dict(lr=a.lr).items() if v is not None}
    cfg = SFTConfig(steps=a.steps, batch_size=a.batch_size, seed=a.data_seed, with_memory=not a.no_memory,
                    checkpoint_every=a.checkpoint_every, quiet=a.quiet, threads=a.threads, **kw)
    examples = sft_examples(world, a.n_examples, seed=a.data_seed)
    r = sft(model, tok, examples, cfg, bank=bank, out_dir=a.out, resume=not a.no_resume)
    return _finetune_outputs(a, "sft", model, tok, world, bank, r, cfg, run)


def cmd_dpo(a) -> int:
    from .data.instructions import preference_pairs
    from .finetune import DPOConfig, dpo
    model, tok, world, bank, run = _finetune_inputs(a)
    kw = {k: v for k, v in dict(lr=a.lr).items() if v is not None}
    cfg = DPOConfig(steps=a.steps, batch_size=a.batch_size, beta=a.beta, seed=a.data_seed,
                    with_memory=not a.no_memory, checkpoint_every=a.checkpoint_every, quiet=a.quiet,
                    threads=a.threads, **kw)
    pairs = preference_pairs(world, a.n_pairs, seed=a.data_seed)
    r = dpo(model, None, tok, pairs, cfg, bank=bank, out_dir=a.out, resume=not a.no_resume)  # reference = --model
    return _finetune_outputs(a, "dpo", model, tok, world, bank, r, cfg, run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mini-m3", description="Memory3 at mini scale (arXiv 2407.01178)")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows every default

    d = sub.add_parser("demo", help="the main job: Memory3 trained in the paper's memory format (top-8 tokens, 5 "
                       "memories per chunk) on the BioWorld, QA on every held-out axis, and the shipped flagship "
                       "evaluated beside it (raw, VQ and RAG)", **fmt)
    _add_common(d)
    d.add_argument("--quick", action="store_true", help="a short run of the same pipeline (CI)")
    d.add_argument("--out", default="runs/demo", help="output folder: results.json, results.png, models and banks")
    d.add_argument("--flagship", default="shipped",
                   help="a reading run's model directory to evaluate beside the demo's own (a flagship's OUT/model); "
                        "'shipped': notebooks/assets/memory3_demo when this is a checkout of the repository; 'none'")
    d.add_argument("--all-tokens", action="store_true",
                   help="the earlier demo instead: the first knowledge world, all tokens of 1 memory per chunk, and a "
                        "no-memory control (experiments/results/demo.json); the options below set it")
    d.add_argument("--preset", default=None, help="all-token demo: model shape (None: tiny)")
    d.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="all-token demo: steps of the warmup stage, no memory (None: 300; 30 with --quick)")
    d.add_argument("--continual-steps", type=non_negative_int, default=None,
                   help="all-token demo: steps of the continual stage, with memory (None: 3300; 40 with --quick)")
    d.add_argument("--selector", default=None, choices=MEMORY_SELECTORS,
                   help="all-token demo: how each memory picks the reference tokens it keeps (None: all)")
    d.add_argument("--tokens-per-head", type=positive_int, default=None,
                   help="all-token demo: reference tokens each memory keeps per head (None: the preset's)")
    d.set_defaults(fn=cmd_demo)

    fl = sub.add_parser("flagship", help="issue 15's flagship: train a model to read the paper's memory format "
                        "(top-8 tokens, 5 memories per chunk) and report every held-out axis", **fmt)
    _add_common(fl)
    fl.add_argument("--quick", action="store_true", help="the same chain on a small world, a few steps a stage (CI)")
    from .data.bios import WORDINGS
    fl.add_argument("--wordings", choices=WORDINGS, default="base",
                    help="the training text's wordings: 'wide' and 'compositional' add training templates, 'neutral' "
                         "also tells some facts only by their value (levers; "
                         "the held-out wordings are the same in every world)")
    fl.add_argument("--out", default="runs/flagship", help="output folder: results.json, model/, bank/, stage logs")
    fl.set_defaults(fn=cmd_flagship)

    s = sub.add_parser("smoke", help="build tiny, encode two references, generate a few tokens", **fmt)
    _add_common(s)
    s.set_defaults(fn=cmd_smoke)

    t = sub.add_parser("train", help="two-stage pretraining (§3.6) on .txt files, the knowledge world or chunked "
                                     "data; FSDP2-sharded under torchrun", **fmt,
                       description="Two-stage Memory³ pretraining (§3.6): a warmup stage without memory, then a "
                                   "continual stage with memory. In one process `train.train` runs it; under "
                                   "`torchrun --nproc_per_node=N -m mini_m3 train ...` (WORLD_SIZE > 1) the model is "
                                   "sharded with FSDP2 and every rank takes a slice of each global batch.")
    _add_common(t)
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-dir", help="folder of UTF-8 .txt files (runs the §4 pipeline into OUT/data)")
    src.add_argument("--world", type=positive_int, metavar="N",
                     help="the synthetic knowledge world of N people (the demo's), built once into OUT/data by "
                          "rank 0 and reused by later runs")
    src.add_argument("--data", metavar="DIR", help="training data written by mini_m3.distributed.save_chunked_data "
                                                   "(data.safetensors, tokenizer.json)")
    t.add_argument("--out", default="runs/train", help="output folder: data/, warmup/, continual/, model/")
    t.add_argument("--preset", default="small", help="model shape (tiny, small, ...; see Memory3Config)")
    t.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override fields of the preset's Memory3Config, e.g. --set chunk_length=32 "
                        "reference_length=64 n_layers=8 max_seq_len=4096 memory_selector=all (VALUE as JSON, else a "
                        "string); the model's memory format and shape travel with it into build-bank and evaluate")
    t.add_argument("--vocab-size", type=positive_int, default=2048,
                   help="tokenizer vocabulary size of --text-dir and --world (--data brings its tokenizer)")
    t.add_argument("--chunks-per-sequence", type=positive_int, default=4,
                   help="training sequence length of --text-dir and --world, in chunks of the config's chunk_length "
                        "(64) tokens")
    t.add_argument("--batch-size", type=positive_int, default=16,
                   help="sequences per step (the global batch: under torchrun split across the ranks)")
    t.add_argument("--micro-batch", type=positive_int, default=None,
                   help="torchrun only: sequences per rank per forward pass, gradients accumulated over them (the "
                        "same update, less activation memory; None: the rank's whole slice at once)")
    t.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    t.add_argument("--continual-lr", type=positive_float, default=None,
                   help="peak learning rate of the continual stage (None: --lr; §5 used ~5e-5 after a warmup peak "
                        "of ~8e-4)")
    t.add_argument("--warmup-steps", type=non_negative_int, default=200,
                   help="steps of the warmup stage (no memory); 0 skips the stage")
    t.add_argument("--continual-steps", type=non_negative_int, default=200,
                   help="steps of the continual stage (with memory); 0 skips the stage")
    t.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints")
    t.add_argument("--no-resume", action="store_true",
                   help="never resume: a run into an OUT that holds checkpoints of this stage is refused "
                        "(nothing is deleted); without it, training resumes from them")
    t.add_argument("--stop-at", type=positive_int, default=None,
                   help="torchrun only: end the continual stage after this many steps, as if the job were killed "
                        "(only its periodic checkpoints remain, and no OUT/model)")
    t.add_argument("--no-save-model", action="store_true",
                   help="do not write OUT/model (nor OUT/control_model) at the end")
    t.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="one process and --text-dir only: log the held-out loss with and without memory every N "
                        "steps (0 = never) and keep the lowest-loss model in OUT/best_model (record in "
                        "OUT/best.json)")
    t.add_argument("--control", action="store_true",
                   help="one process only: also train the no-memory control on the same tokens and steps into "
                        "OUT/control_model")
    _add_device_flags(t, ("float32", "bfloat16"),
                      "; training takes float32 or bfloat16 (float16 would need loss scaling), with float32 master "
                      "weights and AdamW state; one process only (under torchrun: --bf16)", device_default=None,
                      device_help=" (None: cpu; under torchrun, every rank on cuda:LOCAL_RANK when CUDA is available, "
                                  "else cpu; give cpu or cuda there)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="torchrun only: FSDP2 mixed precision, bf16 parameters for compute with fp32 master weights "
                        "and gradient reduction (None: on for cuda, off for cpu)")
    t.add_argument("--meta-init", action="store_true",
                   help="torchrun only: build the model on the meta device and draw each rank's shards after "
                        "sharding (for models one rank cannot hold); the weights of --world/--data's one-process "
                        "initialisation (with --text-dir they differ from a one-process run's)")
    _add_split_flags(t)
    t.set_defaults(fn=cmd_train)

    b = sub.add_parser("build-bank", help="encode references into a memory bank", **fmt)
    _add_common(b)
    b.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.json)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-dir", help="folder of .txt files (runs the §4 pipeline)")
    src.add_argument("--references", help="JSONL file with a 'text' field per line")
    b.add_argument("--out", required=True, help="bank folder (with --text-dir, the pipeline writes to OUT.data)")
    b.add_argument("--vq", default=None, help="faiss factory string, or 'default'")
    b.add_argument("--overwrite", action="store_true", help="replace an existing bank at --out")
    _add_device_flags(b)
    _add_split_flags(b)
    b.add_argument("--heldout-references", action="store_true",
                   help="with --text-dir: put the held-out documents' references in the bank too (knowledge added "
                        "after training; evaluation's leakage filter keeps a chunk from reading its own sentences)")
    b.set_defaults(fn=cmd_build_bank)

    g = sub.add_parser("generate", help="generate text with memory, RAG or neither", **fmt)
    _add_common(g)
    g.add_argument("--model", required=True, help="model directory")
    g.add_argument("--bank", help="memory bank built by --model (needed by --mode memory and rag)")
    g.add_argument("--mode", default="memory", choices=["memory", "rag", "none"],
                   help="explicit memory, reference texts in the prompt, or the plain model")
    g.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate")
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature, 0 = greedy")
    _add_device_flags(g)
    g.add_argument("prompt", help="the text to continue")
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("evaluate", help="QA exact match on the knowledge world or on one's own questions (--qa), "
                                        "or held-out loss of one's own corpus (--text-dir)", **fmt)
    _add_common(e)
    e.add_argument("--model", required=True, help="model directory")
    e.add_argument("--bank", help="memory bank built by --model")
    e.add_argument("--mode", default="memory", choices=["memory", "rag", "none"], help="world QA: how to read --bank")
    e.add_argument("--split", default="heldout", choices=["text", "memory", "heldout"], help="world QA split")
    e.add_argument("--n", type=positive_int, default=300, help="world QA: number of questions")
    e.add_argument("--n-people", type=positive_int, default=2000, help="world QA: world size used by the demo")
    what = e.add_mutually_exclusive_group()
    what.add_argument("--text-dir", help="held-out loss instead of world QA: a `train` OUT folder, its data/ folder, "
                                         "or the folder of .txt files (split again with --seed/--heldout-fraction)")
    what.add_argument("--qa", help="one's own questions instead of world QA: a JSONL file, one {\"question\": ..., "
                                   "\"answer\": ...} per line (optional \"reference\": index of the bank text holding "
                                   "the answer), each asked in the model's QA prompt with memory, memory off and RAG")
    e.add_argument("--control-model", help="--text-dir: a no-memory model trained on the same tokens, to compare")
    e.add_argument("--no-leakage-filter", action="store_true",
                   help="--text-dir: switch off the 2/3 evaluation leakage filter (§4.3)")
    e.add_argument("--out", default=None, help="result JSON of --qa (default qa_eval.json) or --text-dir (default "
                                               "heldout_eval.json, and a PNG beside it)")
    _add_device_flags(e)
    _add_split_flags(e)
    e.set_defaults(fn=cmd_evaluate)

    for name, helptext in (("sft", "supervised fine-tuning on world conversations, with explicit memory (§6.1)"),
                           ("dpo", "DPO alignment against a frozen copy of --model (§6.2)")):
        f = sub.add_parser(name, help=helptext, **fmt)
        _add_common(f)
        f.add_argument("--model", required=True,
                       help="model directory: a reading run's (notebooks/assets/memory3_demo, the flagship: its world "
                            "comes with it), the all-token demo's (runs/demo_alltoken/memory3_model), or an sft "
                            "OUT/model")
        f.add_argument("--bank", help="memory bank built by --model (an sft OUT/bank, runs/demo_alltoken/bank_raw); "
                                      "a reading run's is built in OUT/bank_in if not given")
        f.add_argument("--n-people", type=positive_int, default=2000,
                       help="the all-token demo's world size (--seed is the world's seed, as in the demo); a reading "
                            "run's world comes from its settings")
        f.add_argument("--data-seed", type=int, default=0, help="seed of the generated data and batch order")
        f.add_argument("--steps", type=positive_int, default=300 if name == "sft" else 100, help="optimizer steps")
        f.add_argument("--batch-size", type=positive_int, default=16,
                       help="conversations per step" if name == "sft" else "preference pairs per step")
        f.add_argument("--lr", type=positive_float, default=None,
                       help=f"peak LR (None: {'SFTConfig' if name == 'sft' else 'DPOConfig'}'s)")
        if name == "sft":
            f.add_argument("--n-examples", type=positive_int, default=3000,
                           help="SFT conversations generated from the world")
        else:
            f.add_argument("--n-pairs", type=positive_int, default=2000,
                           help="preference pairs generated from the world")
            f.add_argument("--beta", type=positive_float, default=0.01,
                           help="DPO's beta: how far the policy may move from the frozen --model")
        f.add_argument("--no-memory", action="store_true", help="fine-tune without explicit memory")
        f.add_argument("--probe-questions", type=non_negative_int, default=60,
                       help="factuality probe size (0 = skip)")
        f.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints")
        f.add_argument("--no-resume", action="store_true",
                       help="start at step 0 even if OUT holds checkpoints; without it, training resumes from them")
        f.add_argument("--out", default=f"runs/{name}",
                       help="output folder: checkpoints, log, model/, bank/ (with memory), summary.json")
        f.set_defaults(fn=cmd_sft if name == "sft" else cmd_dpo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for result files
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return args.fn(args)
    # What bad input raises: ValueError (BankError, JSON and UTF-8 errors are ValueErrors too), OSError (a missing
    # file, a folder where a file should be, no permission, a full disk) and RecursionError (deeply nested JSON
    # that a module parsed with `json` directly). Other exceptions are bugs: they keep their traceback.
    except (ValueError, OSError, RecursionError) as e:
        message = " ".join(str(e).split("\n")) or type(e).__name__
        if isinstance(e, RecursionError):
            message += " (input nested too deeply?)"
        print(f"mini-m3 {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
