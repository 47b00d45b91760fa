"""§3.6 and §5 training data on the synthetic knowledge world: world, tokenizer, retriever, chunks with references.

What every run on the knowledge world starts from (the demo, `mini-m3 train --world N`, the experiments,
notebook 05): `setup_world` generates the world and trains its tokenizer, builds the model config in the run's
memory format and fits a retriever on the references (the bank's texts); `build_world_data` tokenizes the training
documents into chunks and retrieves each chunk's reference once, before training (`train.retrieve_for_chunks`).
Both read only the fields of `WorldSettings`; `demo.DemoSettings` extends it with the demo's training and
evaluation settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Memory3Config
from .data.world import World
from .memory.retrieve import Retriever
from .tokenizer import Tokenizer
from .train import ChunkedData, pack_documents, pack_stream, retrieve_for_chunks


@dataclass
class WorldSettings:
    """The world, its tokenizer, the model's memory format and the training documents (all seeded by `seed`)."""

    seed: int = 0
    preset: str = "tiny"
    n_people: int = 2000
    vocab_size: int = 2048
    n_docs: int = 24000
    chunks_per_sequence: int = 1
    # training text: QA about `memory` and `text` people, each chunk reading its retrieved biography. Biographies
    # of "text" people ("bio"), abstract skills ("skill") and "reading" texts are available (World.training_documents)
    # but off: with 20 % of them, reading memory appears ~1,000 steps later and the demo stops inside the transition
    mix: tuple[tuple[str, float], ...] = (("qa", 1.0),)
    selector: str = "all"
    tokens_per_head: int | None = None
    memories_per_chunk: int = 1  # memories read per chunk (the paper reads 5)


@dataclass
class WorldSetup:
    """What every run on the knowledge world starts from (seeded by the settings)."""

    world: World
    tokenizer: Tokenizer
    cfg: Memory3Config
    references: list[str]
    reference_tokens: list[list[int]]
    retriever: Retriever


def setup_world(s: WorldSettings) -> WorldSetup:
    """The world, its tokenizer, the model config for it, the references (the bank's texts) and a retriever."""
    world = World.generate(s.n_people, seed=s.seed)
    tokenizer = Tokenizer.train(world.tokenizer_corpus(seed=s.seed), s.vocab_size)
    fmt = {"memory_tokens_per_head": s.tokens_per_head} if s.tokens_per_head else {}
    cfg = Memory3Config.from_name(s.preset, vocab_size=max(s.vocab_size, tokenizer.vocab_size),
                                  memories_per_chunk=s.memories_per_chunk, memory_selector=s.selector, **fmt)
    references = world.references()
    return WorldSetup(world, tokenizer, cfg, references, tokenizer.encode_references(references),
                      Retriever().fit(references))


def build_world_data(world: World, tokenizer: Tokenizer, s: WorldSettings, chunk_length: int,
                     retriever: Retriever, reference_tokens, progress: bool, docs=None,
                     stream_length: int | None = None) -> ChunkedData:
    """The training documents (or `docs`) tokenized, one per chunk (`pack_documents`), or back to back in
    sequences of `stream_length` tokens (`pack_stream`), each chunk with its retrieved reference."""
    docs = docs if docs is not None else world.training_documents(s.n_docs, seed=s.seed, mix=dict(s.mix))
    ids = tokenizer.encode_batch([d.text for d in docs])
    if stream_length is None:
        tokens, targets = pack_documents(ids, chunk_length, s.chunks_per_sequence, bos_id=tokenizer.bos_id,
                                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    elif stream_length % chunk_length:
        raise ValueError(f"stream_length={stream_length} is not a multiple of chunk_length={chunk_length}")
    else:
        tokens, targets = pack_stream(ids, stream_length, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    refs = retrieve_for_chunks(tokens, chunk_length, tokenizer, retriever, reference_tokens, progress=progress)
    return ChunkedData(tokens, targets, refs, reference_tokens)
