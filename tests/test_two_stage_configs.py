"""§3.6 the two training stages under one schedule (`train.two_stage_configs`): its rule, and every call site
(demo, Fig 11 arms, ablations, `mini-m3 train`) building the very TrainConfigs it built before (issue 17)."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

import mini_m3.demo as demo
from mini_m3.config import Memory3Config
from mini_m3.demo import FIG11_ARMS, DemoSettings
from mini_m3.cli import build_parser, stage_configs
from mini_m3.train import TrainConfig, reference_rows, two_stage_configs, wsd_lr


# ---- the configs each call site wrote out itself before `two_stage_configs` (commit d0438c1)
def old_demo(s: DemoSettings, quiet: bool, threads: int) -> tuple[TrainConfig, TrainConfig, TrainConfig]:
    """demo._run_alltoken_demo's stage() for Memory³'s two stages, and demo.control_train_config."""
    total = s.warmup_steps + s.continual_steps
    kw = dict(batch_size=s.batch_size, lr=s.lr, seed=s.seed, selector=s.selector, tokens_per_head=s.tokens_per_head,
              quiet=quiet, threads=threads)
    return (TrainConfig(stage="warmup", steps=s.warmup_steps, warmup_steps=max(1, s.warmup_steps // 10),
                        decay_fraction=0.0, **kw),
            TrainConfig(stage="continual", steps=s.continual_steps, warmup_steps=0,
                        decay_fraction=min(1.0, 0.1 * total / s.continual_steps), **kw),
            TrainConfig(stage="warmup", steps=total, batch_size=s.batch_size, lr=s.lr, seed=s.seed, quiet=quiet,
                        warmup_steps=max(1, total // 10), threads=threads))


def old_arm(stage1: str, stage2: str, W: int, C: int, **common) -> list[TrainConfig]:
    """experiments/two_stage.py's arm loop (notebook 05 held a copy; ablations.py built its stages the same way)."""
    total = W + C
    return [TrainConfig(stage=stage1, steps=W, warmup_steps=max(1, total // 10), decay_fraction=0.0, **common),
            TrainConfig(stage=stage2, steps=C, warmup_steps=0, decay_fraction=min(1.0, 0.1 * total / C), **common)]


def old_distributed(a) -> list[TrainConfig]:
    """distributed.stage_configs (now cli.stage_configs, the stages of `mini-m3 train`)."""
    out = []
    for stage, steps in (("warmup", a.warmup_steps), ("continual", a.continual_steps)):
        if steps:
            lr = a.continual_lr if stage == "continual" and a.continual_lr else a.lr
            out.append(TrainConfig(stage=stage, steps=steps, batch_size=a.batch_size, lr=lr, seed=a.seed,
                                   checkpoint_every=a.checkpoint_every, quiet=a.quiet,
                                   threads=a.threads, warmup_steps=max(1, steps // 10) if stage == "warmup" else 0,
                                   decay_fraction=0.0 if stage == "warmup" and a.continual_steps else 0.1))
    return out


def old_train(a) -> list[TrainConfig]:
    """cli.cmd_train's stages (one process, --text-dir) before `mini_m3.distributed`'s command joined it (9318a7a)."""
    W, C = a.warmup_steps, a.continual_steps
    kw = dict(batch_size=a.batch_size, lr=a.lr, seed=a.seed, checkpoint_every=a.checkpoint_every, quiet=a.quiet,
              eval_every=a.eval_every, device=a.device or "cpu", dtype=a.dtype)
    configs = two_stage_configs(W, C, lr_warmup=max(1, W // 10) if W else 0,
                                last_decay_fraction=TrainConfig.decay_fraction, **kw) if W + C else []
    return [tc for tc in configs if tc is not None]


# ---- call sites
@pytest.mark.parametrize("s", [DemoSettings(), DemoSettings.quick()], ids=["full", "quick"])
def test_the_demo_trains_with_the_configs_it_had(s):
    for quiet, threads in ((False, 1), (True, 2)):
        warm, cont, control = old_demo(s, quiet, threads)
        assert demo.memory3_train_configs(s, quiet=quiet, threads=threads) == (warm, cont)
        # the control alone changed (issue 17): it warms its LR up as Memory³ does (30 steps, not 360)
        assert demo.control_train_config(s, quiet=quiet, threads=threads) == dataclasses.replace(
            control, warmup_steps=warm.warmup_steps)


@pytest.mark.parametrize("s", [DemoSettings(), DemoSettings.quick()], ids=["full", "quick"])
def test_the_demo_control_has_memory3s_learning_rate_at_every_step(s):
    warm, cont = demo.memory3_train_configs(s, quiet=True, threads=1)
    control = demo.control_train_config(s, quiet=True, threads=1)
    memory3 = [wsd_lr(i, warm) for i in range(warm.steps)] + [wsd_lr(i, cont) for i in range(cont.steps)]
    assert control.steps == len(memory3)
    assert [wsd_lr(i, control) for i in range(control.steps)] == pytest.approx(memory3, rel=1e-12)


def test_a_demo_without_one_of_its_stages_is_refused_before_training():
    for field in ("warmup_steps", "continual_steps"):
        with pytest.raises(ValueError, match=f"DemoSettings: {{'{field}': 0}} must be >= 1"):
            DemoSettings.quick(**{field: 0})


@pytest.mark.parametrize("s, W, C, kw", [
    (DemoSettings(), 1200, 2400, dict(quiet=True)),  # experiments/results/two_stage.json
    (DemoSettings.quick(), 30, 40, dict(quiet=False)),  # two_stage.py --quick
    (DemoSettings.quick(threads=1), 12, 20, dict(quiet=True, threads=1)),  # notebook 05's in-process run
], ids=["recorded", "quick", "notebook"])
def test_every_fig11_arm_trains_with_the_configs_it_had(monkeypatch, tmp_path, s, W, C, kw):
    """demo.two_stage_arm (experiments/two_stage.py, notebook 05) trains each arm's stages with the old configs;
    training, the bank and QA are stubbed: only the configs matter here."""
    seen = []

    def fake_train(model, data, tc):
        seen.append(tc)
        return {"losses": [1.0] * tc.steps, "final_loss": 1.0}
    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo, "MemoryBank", SimpleNamespace(build=lambda *a, **k: None))
    monkeypatch.setattr(demo, "qa_eval", lambda *a, **k: {"accuracy": 0.5})
    w = SimpleNamespace(cfg=Memory3Config.from_name("tiny", vocab_size=256), tokenizer=None, references=[])
    for arm, (stage1, stage2) in FIG11_ARMS.items():
        seen.clear()
        r = demo.two_stage_arm(arm, w, None, {"heldout": []}, s, W, C, tmp_path / arm, **kw)
        assert seen == old_arm(stage1, stage2, W, C, batch_size=s.batch_size, lr=s.lr, seed=s.seed, **kw), arm
        assert len(r["loss"]) == W + C and r["qa"] == {"heldout": {"memory": 0.5, "none": 0.5}}


@pytest.mark.parametrize("W, C", [(10, 5), (300, 2000)], ids=["quick", "full"])
def test_the_ablation_stages_are_the_configs_they_were(W, C):
    """experiments/ablations.py: the shared warmup, and each variant's continual stage (its own batch, evaluations)."""
    s = DemoSettings.quick() if W == 10 else DemoSettings()
    common = dict(lr=s.lr, seed=s.seed, quiet=True, threads=1)
    warm, cont = two_stage_configs(W, C, batch_size=s.batch_size, **common)
    old_warm, _ = old_arm("warmup", "continual", W, C, batch_size=s.batch_size, **common)
    _, old_cont = old_arm("warmup", "continual", W, C, eval_every=500, batch_size=8, **common)
    assert warm == old_warm and dataclasses.replace(cont, eval_every=500, batch_size=8) == old_cont


@pytest.mark.parametrize("args", [[], ["--continual-lr", "1e-4"], ["--warmup-steps", "0"], ["--continual-steps", "0"],
                                  ["--warmup-steps", "7", "--continual-steps", "3", "--checkpoint-every", "2"]])
def test_the_distributed_stages_keep_their_own_schedule(args):
    a = build_parser().parse_args(["train", "--data", "d", "--out", "o", *args])
    assert stage_configs(a) == old_distributed(a)


@pytest.mark.parametrize("args", [[], ["--warmup-steps", "0"], ["--continual-steps", "0", "--eval-every", "5"],
                                  ["--warmup-steps", "0", "--continual-steps", "0"],
                                  ["--dtype", "bfloat16", "--device", "cpu", "--threads", "1", "--lr", "1e-3"]])
def test_the_text_dir_stages_are_the_ones_train_had(args):
    """`mini-m3 train --text-dir` in one process trains with the configs it had, up to two fields a resume ignores
    (train.RESUME_FREE_FIELDS): threads is now passed (the same count cmd_train set), and device is None unless
    given (the model stays on the CPU, as --device cpu put it)."""
    a = build_parser().parse_args(["train", "--text-dir", "t", *args])
    free = lambda tc: dataclasses.replace(tc, threads=None, device=None)  # noqa: E731
    assert [free(tc) for tc in stage_configs(a)] == [free(tc) for tc in old_train(a)]


# ---- the rule
@pytest.mark.parametrize("W, C", [(1200, 2400), (400, 3200), (30, 40)])
def test_both_stages_follow_the_schedule_of_one_run_of_all_steps(W, C):
    """Every step of the two stages gets the learning rate the same step of a single run of W + C steps gets (the
    no-memory control's), when the LR warmup fits in the first stage and the decay in the last."""
    warm, cont = two_stage_configs(W, C, lr=1.0)
    single, none = two_stage_configs(W + C, 0, lr=1.0)
    assert none is None and single == TrainConfig(stage="warmup", steps=W + C, warmup_steps=max(1, (W + C) // 10),
                                                  lr=1.0)
    staged = [wsd_lr(i, warm) for i in range(W)] + [wsd_lr(i, cont) for i in range(C)]
    assert staged == [wsd_lr(i, single) for i in range(W + C)]
    assert (warm.stage, cont.stage) == ("warmup", "continual")
    assert [tc.stage for tc in two_stage_configs(W, C, stages=FIG11_ARMS["memory-memory"])] == ["continual"] * 2


def test_a_stage_of_no_steps_is_none_and_the_other_holds_the_whole_schedule():
    warm, cont = two_stage_configs(0, 50, seed=3)
    assert warm is None and cont == TrainConfig(stage="continual", steps=50, warmup_steps=5, decay_fraction=0.1, seed=3)
    assert two_stage_configs(50, 0, lr_warmup=0, last_decay_fraction=0.2) == (
        TrainConfig(stage="warmup", steps=50, warmup_steps=0, decay_fraction=0.2), None)


@pytest.mark.parametrize("args, kw, match", [
    ((0, 0), {}, "both 0"), ((10, -1), {}, "continual_steps=-1"), ((10, 5), dict(lr_warmup=1.5), "lr_warmup=1.5"),
    ((10, 5), dict(stage="continual"), r"sets \['stage'\] itself"), ((10, 5), dict(stages=("warmup",)), "two stages"),
    ((10, 5), dict(batch_size=0), "TrainConfig.batch_size=0"),
])
def test_bad_stage_settings_are_refused_naming_the_field(args, kw, match):
    with pytest.raises(ValueError, match=match):
        two_stage_configs(*args, **kw)


# ---- reference ids -> rows of the encoded batch
def test_reference_rows_maps_global_ids_to_rows_of_one_encoded_batch():
    index = torch.tensor([[[7, -1], [3, 7]], [[-1, -1], [12, 3]]])
    used, local = reference_rows(index)
    assert used == [3, 7, 12]
    assert local.tolist() == [[[1, -1], [0, 1]], [[-1, -1], [2, 0]]] and local.dtype == index.dtype
    assert index.tolist() == [[[7, -1], [3, 7]], [[-1, -1], [12, 3]]]  # the caller's ids are left alone
    used, local = reference_rows(torch.full((2, 3), -1))
    assert used == [] and local.tolist() == [[-1] * 3] * 2
