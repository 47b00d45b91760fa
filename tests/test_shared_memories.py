"""§3.6's one reference encoded per chunk for one-chunk sequences (`share_memories`, a lever): groups of chunks read
one set of references, each chunk's own first; batches keep the groups whole."""

import pytest
import torch

from mini_m3.memory.encode import reference_rows
from mini_m3.reading import ReadingSettings, build_reading_data
from mini_m3.train import TrainConfig, batch_order, memory_index, share_memories


def retrieved(rows):
    return torch.tensor(rows, dtype=torch.long)[:, None, :]  # (N, 1, m)


def test_groups_read_their_members_own_references_own_first():
    # chunks 0-9, chunk j's top-1 is reference 100 + j // 2 (two chunks per person); a chunk's other retrievals
    # are the next people
    refs = retrieved([[100 + j // 2, 100 + (j // 2 + 1) % 5, 100 + (j // 2 + 2) % 5, -1] for j in range(10)])
    order, out = share_memories(refs, 3, seed=0)
    assert sorted(order.tolist()) == list(range(10)) and out.shape == (10, 1, 3)
    own = refs[order, 0, 0]
    for g in range(0, 10, 3):
        members = own[g:g + 3].tolist()
        for k in range(len(members)):
            row = out[g + k, 0].tolist()
            assert row[0] == members[k]  # its own top-1 first
            assert set(r for r in row if r >= 0) == set(members)  # then the other members' (distinct)
    # a leader pulls in chunks whose top-1 is what it retrieved (here every group has 3 distinct people)
    assert all(len(set(own[g:g + 3].tolist())) == 3 for g in range(0, 9, 3))


def test_the_grouping_is_seeded_and_drops_a_leaking_reference():
    refs = retrieved([[j % 4, (j + 1) % 4] for j in range(8)])
    a, b, c = (share_memories(refs, 2, seed=s)[0].tolist() for s in (0, 0, 1))
    assert a == b and a != c
    references = [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]]
    tokens = torch.zeros(8, 8, dtype=torch.long)
    tokens[:, :4] = torch.tensor([50, 51, 52, 53])
    order, out = share_memories(refs, 2, seed=0, tokens=tokens, references=references)
    i = order.tolist().index(0)  # chunk 0's row; its partner's top-1 is another reference it reads
    partner = int(refs[order[i ^ 1], 0, 0])
    assert partner != 0 and out[i, 0].tolist() == [0, partner]
    tokens[0, :4] = torch.tensor(references[partner])  # now chunk 0's text is that reference: reading it leaks
    order2, leak = share_memories(refs, 2, seed=0, tokens=tokens, references=references)
    assert torch.equal(order2, order) and leak[i, 0].tolist() == [0, -1]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="1 chunk"):
        share_memories(torch.zeros(4, 2, 5, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="group"):
        share_memories(torch.zeros(4, 1, 5, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="both"):
        share_memories(torch.zeros(4, 1, 5, dtype=torch.long), 5, tokens=torch.zeros(4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="memory_groups"):
        TrainConfig(memory_groups=0)


def test_batch_order_keeps_blocks_whole_and_block_one_is_unchanged():
    old = lambda n, bs, step, seed: torch.randperm(  # noqa: E731 (the order before blocks existed)
        n, generator=torch.Generator().manual_seed(seed * 100_003 + step // max(1, n // bs)))[
        (step % max(1, n // bs)) * bs:(step % max(1, n // bs) + 1) * bs]
    for step in range(7):
        assert torch.equal(batch_order(23, 4, step, 3), old(23, 4, step, 3))
    epoch = torch.cat([batch_order(23, 10, s, 0, block=5) for s in range(2)])
    assert len(set(epoch.tolist())) == 20  # no row twice in an epoch
    for s in range(2):
        rows = batch_order(25, 10, s, 0, block=5).tolist()
        assert [r // 5 for r in rows] == [rows[0] // 5] * 5 + [rows[5] // 5] * 5  # two whole blocks
        assert all(r % 5 == k % 5 for k, r in enumerate(rows))


def test_a_shared_batch_encodes_about_one_reference_per_chunk():
    kw = dict(preset="tiny", n_people=200, n_docs=400, progress=False)
    world, _, _, cfg, _, plain, docs = build_reading_data(ReadingSettings(**kw))
    *_, data, shared_docs = build_reading_data(ReadingSettings(**kw, shared_memories=True))
    assert data.chunk_refs.shape == plain.chunk_refs.shape == (400, 1, 5)
    own = torch.tensor([d.person for d in shared_docs])
    assert (data.chunk_refs[:, 0, 0] == own).float().mean() > 0.9  # each chunk still reads its own person first
    assert sorted(d.text for d in shared_docs) == sorted(d.text for d in docs)  # the same chunks, regrouped
    held = {p.pid for p in world.people_in("heldout")}
    assert not held & set(data.chunk_refs.flatten().tolist())
    for step in range(3):
        rows = batch_order(400, 30, step, 0, block=5)
        n_shared = len(reference_rows(memory_index(data.chunk_refs[rows], 5))[0])
        n_plain = len(reference_rows(memory_index(plain.chunk_refs[batch_order(400, 30, step, 0)], 5))[0])
        assert n_shared <= 30 < 3 * 30 < n_plain  # one reference per chunk at most, against ~5
