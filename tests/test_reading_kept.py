"""experiments/reading_levers.py's count of the answer tokens a top-k selection keeps (issue 15, point 7 and 15)."""
import importlib.util
from pathlib import Path

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


def test_answer_tokens_kept_counts_what_the_selection_keeps():
    world = BioWorld.generate(60, seed=0)
    docs = world.training_documents(2000, seed=0)
    tok = Tokenizer.train(world.tokenizer_corpus(docs), 1024)
    refs = world.references(lambda t: len(tok.encode_reference(t)) <= 128)
    people = [p for p in world.people if p.split == "heldout"][:5]
    torch.manual_seed(0)
    model = Memory3(Memory3Config.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    levers = _levers()
    every = levers.answer_tokens_kept(model, tok, refs, people, k=128)  # k >= the reference: every token kept
    assert every["n_answer_tokens"] > 0 and every["pooled_any_layer"] == 1.0
    one = levers.answer_tokens_kept(model, tok, refs, people, k=1)  # 1 token per head and layer: most are lost
    assert one["n_answer_tokens"] == every["n_answer_tokens"]
    assert 0.0 <= one["pooled_any_layer"] < 0.5
    for attr in one["per_attribute"].values():
        assert 0.0 <= attr["per_layer"] <= attr["any_layer"] <= 1.0
