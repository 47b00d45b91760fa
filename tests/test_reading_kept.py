"""experiments/reading_levers.py's count of the answer tokens a top-k selection keeps (issue 15, point 7 and 15)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from mini_m3.config import Memory3Config
from mini_m3.data.bios import BioWorld
from mini_m3.model import Memory3
from mini_m3.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _levers():
    spec = importlib.util.spec_from_file_location("reading_levers", ROOT / "experiments" / "reading_levers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _untrained(n_items: int):
    """A 40-person world, its tokenizer, `n_items` questions about memory people in training wordings, and an
    untrained `tiny` model (seed 0)."""
    world = BioWorld.generate(40, seed=1)
    docs = world.training_documents(500, seed=0)
    tok = Tokenizer.train(world.tokenizer_corpus(docs), 1024)
    items = world.eval_questions("memory", n_items, seed=0, question_family="train")
    torch.manual_seed(0)
    return world, tok, items, Memory3(Memory3Config.from_name("tiny", vocab_size=tok.vocab_size)).eval()


def _heldout_bios():
    """A 60-person world's tokenizer, its bank biographies (index = pid) and 5 held-out people; torch seeded 0."""
    world = BioWorld.generate(60, seed=0)
    docs = world.training_documents(2000, seed=0)
    tok = Tokenizer.train(world.tokenizer_corpus(docs), 1024)
    refs = world.references(lambda t: len(tok.encode_reference(t)) <= 128)
    torch.manual_seed(0)
    return tok, refs, [p for p in world.people if p.split == "heldout"][:5]


def test_answer_tokens_kept_counts_what_the_selection_keeps():
    tok, refs, people = _heldout_bios()
    model = Memory3(Memory3Config.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    levers = _levers()
    every = levers.answer_tokens_kept(model, tok, refs, people, k=128)  # k >= the reference: every token kept
    assert every["n_answer_tokens"] > 0 and every["pooled_any_layer"] == 1.0
    assert every["whole_name_one_layer"] == every["whole_answer_and_name_one_layer"] == 1.0
    one = levers.answer_tokens_kept(model, tok, refs, people, k=1)  # 1 token per head and layer: most are lost
    assert one["n_answer_tokens"] == every["n_answer_tokens"]
    assert 0.0 <= one["pooled_any_layer"] < 0.5
    assert one["whole_answer_and_name_one_layer"] <= min(one["whole_name_one_layer"], one["whole_answer_one_layer"])
    assert one["whole_answer_and_name_one_layer"] < 0.5  # 2 names' pieces and an answer's in 4 slots: rarely
    split = levers.answer_tokens_kept(model.with_memory_format(selector="disjoint"), tok, refs, people, k=4)
    paper = levers.answer_tokens_kept(model, tok, refs, people, k=4)
    assert split["distinct_tokens_per_slot"] == 1.0 > paper["distinct_tokens_per_slot"]
    for attr in one["per_attribute"].values():
        assert 0.0 <= attr["per_layer"] <= attr["any_layer"] <= 1.0


def test_question_queries_are_the_memory_layers_queries_where_the_answer_is_predicted():
    """`question_queries` keeps, per memory layer, the un-rotated queries of the positions that predict an answer
    token (or of every position); RoPE only rotates, so each head's query norm equals the model's own q there."""
    world, tok, items, model = _untrained(3)
    levers = _levers()
    answer = levers.question_queries(model, tok, items, "answer")
    every = levers.question_queries(model, tok, items, "all")
    lengths = [(1 + len(tok.encode(it.prompt)), len(tok.encode(" " + it.answer))) for it in items]
    cfg = model.cfg
    assert len(answer) == len(every) == len(cfg.memory_layers)
    assert answer[0].shape == (sum(a for _, a in lengths), cfg.n_heads, cfg.head_dim)
    assert every[0].shape == (sum(p + a for p, a in lengths), cfg.n_heads, cfg.head_dim)
    p, a = lengths[0]
    ids = torch.tensor([[tok.bos_id] + tok.encode(items[0].prompt) + tok.encode(" " + items[0].answer)])
    names = [f"blocks.{l}.attn.hook_q" for l in cfg.memory_layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names=names)
    for li, name in enumerate(names):
        rotated = cache[name][0, :, p - 1:p - 1 + a].transpose(0, 1)  # (a, H, d_h), after RoPE
        assert torch.allclose(answer[li][:a].norm(dim=-1), rotated.norm(dim=-1), atol=1e-5)
        assert torch.allclose(every[li][p - 1:p - 1 + a], answer[li][:a])
        assert not torch.allclose(answer[li][:a], rotated)  # rotated at positions > 0: not the raw query


def test_levers_table_names_the_head_shape_and_reads_the_numbers_from_the_json():
    """The table's model cell tells 8 KV heads of 8 dims from 8 of 16 (the h8 and h16 runs differ only there) and
    names the query heads where there are more than KV heads, and its cells are the JSON's memory / memory-off
    numbers."""
    import json

    from mini_m3.reading import AXES
    paths = [ROOT / "experiments/results" / f"reading_{name}.json" for name in ("n_all1_s0", "h8_1b_s0", "h16_5_s0",
                                                                                 "e2_tiny")]
    rows = _levers().table([str(p) for p in paths]).splitlines()[2:]
    assert len(rows) == 4
    assert "6L d64 kv4x16," in rows[0] and "6L d64 kv8x8," in rows[1] and "6L d64 kv8x16," in rows[2]
    assert "4L d64 q4 kv2x16," in rows[3]  # tiny's own 4 query heads over 2 KV heads: the query heads are named
    for path, row in zip(paths, rows):
        r = json.loads(path.read_text())
        cells = [c.strip() for c in row.strip("|").split("|")][-len(AXES):]
        assert cells == [f"{r['axes'][a]['memory']:.3f} / {r['axes'][a]['memory_off']:.3f}" for a in AXES]
    # a lever of the run's settings is named in the model cell: format mixing (point 29), and only where it was on
    mixed, plain = _levers().table([str(ROOT / "experiments/results" / f"reading_h16_{n}_s0.json")
                                    for n in ("mx", "d5")]).splitlines()[2:]
    assert ", format mixing 0.5 (all tokens, 1 memory) |" in mixed and "format mixing" not in plain


def test_seeds_table_spreads_one_commands_seeds_and_refuses_other_commands(tmp_path, capsys):
    """`seeds`: per axis each seed's memory (off) and the mean [min, max] read from the JSONs; results of another
    command (other settings than the seed) or a repeated seed are refused."""
    import json

    from mini_m3.reading import AXES
    levers = _levers()
    paths = [ROOT / "experiments/results" / f"reading_flagship_s{n}.json" for n in range(3)]
    rows = levers.seeds([str(p) for p in paths]).splitlines()
    rs = [json.loads(p.read_text()) for p in paths]
    assert rows[0].endswith("| seed 0 | seed 1 | seed 2 | mean [min, max] |") and len(rows) == 2 + len(AXES) + 1
    for a, row in zip(AXES, rows[2:]):
        mem = [r["axes"][a]["memory"] for r in rs]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [f"{r['axes'][a]['memory']:.3f} ({r['axes'][a]['memory_off']:.3f})" for r in rs]
        assert cells[4] == f"{sum(mem) / 3:.3f} [{min(mem):.3f}, {max(mem):.3f}]"
    other = ROOT / "experiments/results/reading_flagship_neutral_s1.json"  # --wordings neutral: another command
    with pytest.raises(ValueError, match=r"another command .* settings \['wordings'\]"):
        levers.seeds([str(paths[0]), str(other)])
    with pytest.raises(ValueError, match="repeated seeds"):
        levers.seeds([str(paths[1]), str(paths[1])])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        levers.seeds([str(paths[0])])
    with pytest.raises(SystemExit, match="error: .* is another command"):  # the command line: a message, no traceback
        levers.main(["seeds", str(paths[0]), str(other)])
    levers.main(["seeds", *map(str, paths)])
    assert capsys.readouterr().out.splitlines() == rows


def test_chain_steps_adds_the_runs_a_continuation_started_from(tmp_path):
    """`chain_steps` follows `--init-model` back to the first run: 300 + 2,500, then 1,500, then 1,200."""
    import json

    levers = _levers()
    chain = [("a", 300, 2500, ""), ("b", 0, 1500, "a"), ("c", 0, 1200, "b")]
    for name, warmup, continual, init in chain:
        (tmp_path / name / "model").mkdir(parents=True)
        settings = {"warmup_steps": warmup, "curriculum_steps": 0, "continual_steps": continual,
                    "init_model": str(tmp_path / init / "model") if init else ""}
        (tmp_path / name / "results.json").write_text(json.dumps({"settings": settings}))
    assert [levers.chain_steps(str(tmp_path / n)) for n in "abc"] == [2800, 4300, 5500]
    (tmp_path / "a" / "results.json").unlink()  # a run the chain started from is gone: no silent undercount
    with pytest.raises(FileNotFoundError, match="no results.json"):
        levers.chain_steps(str(tmp_path / "c"))


def test_curve_follows_committed_results_back_along_the_chain(tmp_path):
    """`curve` rebuilds point 38's chain from the committed results alone (2,800 steps of top-8 with 1 memory, then
    1,000 and 1,000 in the paper's format), with each run's held-out numbers, and draws it; a missing link is an error.
    """
    import json
    import shutil

    results = ROOT / "experiments/results"
    got = _levers().curve([str(results / "reading_g40_5b_s1.json")], str(tmp_path / "curve.json"))
    rows = got["chains"][str(results / "reading_g40_5b_s1.json")]
    assert [Path(r["run"]).name for r in rows] == ["reading_g40_1_s1.json", "reading_g40_5_s1.json",
                                                   "reading_g40_5b_s1.json"]
    assert [r["steps"] for r in rows] == [2800, 3800, 4800]
    assert [r["paper_format"] for r in rows] == [False, True, True] and rows[0]["format"] == "attention/8/1"
    for r in rows:
        assert r["heldout"] == json.loads(Path(r["run"]).read_text())["axes"]["heldout"]["memory"]
    assert json.loads((tmp_path / "curve.json").read_text())["chains"] == got["chains"]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("g40_1_s1", "g40_5b_s1"):  # the middle run is gone: no silent shorter chain
        shutil.copy(results / f"reading_{name}.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="reading_g40_5_s1.json is missing"):
        _levers().chain_results(str(tmp_path / "reading_g40_5b_s1.json"))


def test_first_token_reads_scores_the_first_answer_token_per_attribute():
    """Per attribute: the counts add up to the questions, and each share and mean probability is the one a plain
    forward pass gives (memory off); reading the asked person's memory changes the prediction."""
    world = BioWorld.generate(40, seed=1)
    docs = world.training_documents(500, seed=0)
    tok = Tokenizer.train(world.tokenizer_corpus(docs), 1024)
    refs = world.references(lambda t: len(tok.encode_reference(t)) <= 128)
    items = world.eval_questions("memory", 12, seed=0, question_family="train")
    torch.manual_seed(0)
    model = Memory3(Memory3Config.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    got = _levers().first_token_reads(model, tok, refs, items)
    assert sum(a["n"] for a in got.values()) == len(items)
    for attr, a in got.items():
        asked = [it for it in items if it.attribute == attr]
        hits, probs = 0.0, 0.0
        for it in asked:
            with torch.no_grad():
                logits = model(torch.tensor([[tok.bos_id] + tok.encode(it.prompt)])).logits[0, -1]
            gold = tok.encode(" " + it.answer)[0]
            hits += float(logits.argmax() == gold)
            probs += float(torch.softmax(logits, -1)[gold])
        assert a["n"] == len(asked)
        assert abs(a["first_memory_off"] - hits / len(asked)) < 1e-9
        assert abs(a["p_memory_off"] - probs / len(asked)) < 1e-6
        assert 0.0 <= a["first_memory"] <= 1.0 and 0.0 < a["p_memory"] < 1.0
    assert any(abs(a["p_memory"] - a["p_memory_off"]) > 1e-6 for a in got.values())


def test_plot_first_draws_each_attribute_against_the_steps(tmp_path):
    attrs = {"birth_date": {"n": 3, "first_memory": 0.0, "first_memory_off": 0.0},
             "major": {"n": 2, "first_memory": 1.0, "first_memory_off": 0.5}}
    result = {"question_set": "heldout", "runs": {"runs/a": {"steps": 100, "per_attribute": attrs},
                                                  "runs/b": {"steps": 300, "per_attribute": attrs}}}
    _levers().plot_first(result, tmp_path / "first.png")
    assert (tmp_path / "first.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_flags_turn_gradients_through_reference_encoding_off_and_the_table_says_so(tmp_path):
    """`--no-memory-grad` (a lever) reaches ReadingSettings as False, the default stays the paper's natural reading
    (True), and a results file with it off is named in the lever table's model cell."""
    import json

    levers = _levers()
    out, s = levers.parse_run(["--out", "runs/x", "--no-memory-grad", "--lr", "5e-4"])
    assert out == "runs/x" and s.memory_grad is False and s.lr == 5e-4
    assert levers.parse_run(["--out", "runs/x"])[1].memory_grad is True
    r = json.loads((ROOT / "experiments/results/reading_h16_e5p_s0.json").read_text())
    (tmp_path / "on.json").write_text(json.dumps(r))
    r["settings"]["memory_grad"] = False
    (tmp_path / "off.json").write_text(json.dumps(r))
    on, off = (row.split(" | ")[2] for row in  # the model cell (the path's folder may say "gradient" too)
               levers.table([str(tmp_path / "on.json"), str(tmp_path / "off.json")]).splitlines()[2:])
    assert off.endswith(", no gradient through reference encoding") and "gradient" not in on


def test_span_reads_splits_each_answer_token_by_whether_the_top_k_kept_it():
    """`span_reads` (the `span` diagnostic): with k at least the reference's length every answer token is kept and
    the top-k reads exactly what all tokens read; with k = 1 most are lost, and kept + lost add up to every token."""
    world = BioWorld.generate(60, seed=0)
    docs = world.training_documents(2000, seed=0)
    tok = Tokenizer.train(world.tokenizer_corpus(docs), 1024)
    refs = world.references(lambda t: len(tok.encode_reference(t)) <= 128)
    items = world.eval_questions("heldout", 12, seed=0, question_family="train", bio_family="train")
    torch.manual_seed(0)
    model = Memory3(Memory3Config.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    levers = _levers()
    every = levers.span_reads(model, tok, refs, items, k=128)["all_attributes"]
    assert every["first_kept"]["n"] == len(items) and every["later_kept"]["n"] > 0
    for part in ("first", "later"):
        assert every[f"{part}_kept"]["share"] == 1.0 and f"{part}_top8_if_lost" not in every
        assert every[f"{part}_top8_if_kept"] == every[f"{part}_all"]
    one = levers.span_reads(model, tok, refs, items, k=1)["all_attributes"]
    assert one["later_kept"]["share"] < 0.5
    for part in ("first", "later"):
        n = [one.get(f"{part}_top8_if_{s}", {"n": 0})["n"] for s in ("kept", "lost")]  # absent: none of them
        assert sum(n) == every[f"{part}_kept"]["n"] and n[0] == round(one[f"{part}_kept"]["share"] * sum(n))
        bins = {k: v["n"] for k, v in one.items() if k.startswith(f"{part}_top8_if_heads_")}  # by heads keeping it
        assert sum(bins.values()) == sum(n) and bins.get(f"{part}_top8_if_heads_0", 0) == n[1]
    heads = len(model.cfg.memory_layers) * model.cfg.n_kv_heads  # k >= the reference: every head keeps every token
    assert heads == 4 and {k for k in every if "_heads_" in k} == {"first_top8_if_heads_4-7", "later_top8_if_heads_4-7"}


def test_choice_scores_compare_the_asked_value_with_the_retrieved_peoples():
    """`choice_scores` (the `choice` diagnostic), memory off: with only the asked person retrieved it always
    "chooses"; with two other people it counts a distractor exactly when one of their different values has a higher
    answer log-likelihood than the asked value, as a plain forward pass computes it."""
    world, tok, items, model = _untrained(10)
    levers, people = _levers(), list(world.people)
    own = levers.choice_scores(model, tok, items, [[it.person] for it in items], people)
    assert (own["chose"], own["distractor"], own["retrieved"]) == (1.0, 0.0, 1.0)

    def loglik(prompt: str, value: str) -> float:
        p, a = [tok.bos_id] + tok.encode(prompt), tok.encode(" " + value)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].float(), -1)
        return float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(a)))

    others = [[(it.person + d) % len(people) for d in (1, 2)] for it in items]
    got = levers.choice_scores(model, tok, items, others, people)
    wrong = []
    for it, r in zip(items, others):
        values = {getattr(people[j], it.attribute) for j in r} - {it.answer}
        wrong.append(max((loglik(it.prompt, v) for v in values), default=float("-inf")) > loglik(it.prompt, it.answer))
    assert 0 < sum(wrong) < len(items)  # the check is not vacuous
    assert got["distractor"] == sum(wrong) / len(items) and got["chose"] == 1 - got["distractor"]
    assert got["retrieved"] == 0.0


def test_diagnostics_read_a_model_trained_with_a_top_k_lever_in_its_own_selector(capsys):
    levers = _levers()
    tiny = Memory3(Memory3Config.from_name("tiny")).eval()
    assert levers.own_top_k(tiny) == "attention"
    assert levers.own_top_k(tiny.with_memory_format(selector="all")) == "attention"  # an all-tokens model: the paper's
    for lever in ("headmax", "disjoint"):
        assert levers.own_top_k(tiny.with_memory_format(selector=lever)) == lever
    with pytest.raises(SystemExit, match="--only takes one selector of"):  # refused before any run is read
        levers.main(["formats", "out.json", "no_such_run", "--only", "bogus"])
    with pytest.raises(SystemExit, match="--only takes one selector of"):
        levers.main(["formats", "out.json", "--only", "headmax", "no_such_run"])


def test_layer_copies_scores_every_layer_and_the_own_set_matches_the_models_selection():
    """`layer_copies` counts, per answer token, the heads of every layer that would keep it: its own memory layers
    must count what the model's own selection keeps (`answer_tokens_kept`), and adding layers never loses a token."""
    tok, refs, people = _heldout_bios()
    model = Memory3(Memory3Config.from_name("tiny", vocab_size=tok.vocab_size, n_layers=4,
                                            memory_layers=[1, 2])).eval()
    levers = _levers()
    r = levers.layer_copies(model, tok, refs, people, k=4)
    own = levers.answer_tokens_kept(model, tok, refs, people, k=4)
    assert r["n_answer_tokens"] == own["n_answer_tokens"] > 0 and len(r["heads_per_answer_token"]) == 4
    sets = r["layer_sets"]
    assert set(sets) == {"own", "own+0", "own+3", "every"} and sets["own"]["layers"] == [1, 2]
    assert sets["own"]["kept"] == pytest.approx(own["pooled_any_layer"])
    assert sets["own"]["mean_heads"] == pytest.approx(sum(r["heads_per_answer_token"][1:3]))
    for name in ("own+0", "own+3", "every"):
        assert sets[name]["kept"] >= sets["own"]["kept"] and sets[name]["mean_heads"] >= sets["own"]["mean_heads"]
        assert sets[name]["heads_4_or_more"] <= sets[name]["heads_2_or_more"] <= sets[name]["kept"]
    assert sets["every"]["mean_heads"] == pytest.approx(sum(r["heads_per_answer_token"]))
    every = levers.layer_copies(model, tok, refs, people, k=128)  # k >= the reference: every head keeps every token
    assert every["layer_sets"]["own"]["mean_heads"] == 2 * model.cfg.n_kv_heads
    with pytest.raises(ValueError, match="learned"):
        levers.layer_copies(Memory3(model.cfg.replace(memory_selector="learned", memory_selection_queries=2)), tok,
                            refs, people)
