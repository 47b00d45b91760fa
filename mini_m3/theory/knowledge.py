"""§2 memory circuitry theory, Defs 4, 6–7: specific vs abstract knowledge, and whether a prefix or memory supplies it.

A knowledge is probed through one of its realizations t, split into an input part (t_0 …, ending before
the associated outputs) and the output tokens t_out. With P_M(t_i | …) the model's teacher-forced
probability of each output token:

* **Def 6 (i), M lacks 𝒦**: some output token has P_M(t_i | t_0 … t_{i-1}) ≤ 1/2 (``LACKS_THRESHOLD``);
* **Def 6 (ii), a prefix t* supplies 𝒦**: every output token has P_M(t_i | t* t_0 … t_{i-1}) ≥ 0.9
  (``HAS_THRESHOLD``). 𝒦 is separable when some M satisfies both.
* **Def 7, imitable**: (ii) holds with *any* realization t′ of 𝒦 as the prefix t*, for every realization t.

Memory³'s claim (Claim 1, Remark 1) is that the realization does not have to be read as text: it can be
read as *explicit memory*. So every test here runs three ways: without help, with the realization as a text
prefix, and with the realization's explicit memory (its sparse key-values, read by every token).

The verdict logic is in pure functions of the probabilities (:func:`lacks`, :func:`produces`,
:func:`knowledge_verdicts`, :func:`imitability_verdict`, :func:`kind_verdict`). Not implemented: Def 6's
summing of probabilities over branches when one input has several admissible outputs.

**Def 4, specific vs abstract, by intervention** (:func:`knowledge_kind`). A specific knowledge's output is
fixed by its input tokens ("China" + "capital" → "Beijing", an n-gram); an abstract one's output is arbitrary,
taken from the context (the induction head: "…[a][b]…[a]" → "[b]"). A probe is written in the second form:
an input whose context already holds the output at least once, ending at the cue. The intervention swaps the output in
the context for another answer [b′] and asks where the prediction goes: it *follows the context*
(P(b′) ≥ ``FOLLOW_THRESHOLD``: abstract) or *stays with the input* (P(b) ≥ ``STAY_THRESHOLD``: specific).
A behaviour the model does not have in the first place (P(b) ≤ 1/2 on the unswapped probe, Def 6 (i)) is
'neither'. With ``via="memory"`` the context that holds the output is a realization read as *explicit memory*,
and the swap is made there: an output that follows the swapped memory is read from memory (abstract), one that
stays is fixed by the input. This is a behavioural proxy for Def 4's white-box circuit classes: it reads what
decides the output, not which heads compute it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..memory.encode import ExplicitMemory, encode_reference_tokens
from ..model import MemoryKV
from .circuits import memory_kwargs

LACKS_THRESHOLD = 0.5
HAS_THRESHOLD = 0.9
FOLLOW_THRESHOLD = 0.5  # Def 4: P(swapped-in answer b′ | swapped context) ≥ this → the output follows the context
STAY_THRESHOLD = 0.5    # Def 4: P(original answer b | swapped context) ≥ this → the output is fixed by the input
KINDS = ("specific", "abstract", "neither")


# ----------------------------------------------------------------------------------------------- probabilities
@torch.no_grad()
def output_probabilities(model, prefix_ids: Sequence[int], input_ids: Sequence[int], output_ids: Sequence[int], *,
                         memory: ExplicitMemory | MemoryKV | None = None) -> np.ndarray:
    """P(t_i | prefix, t_0 … t_{i-1}) for each output token t_i, by teacher forcing (float64 array).

    The model reads ``prefix_ids + input_ids + output_ids[:-1]`` in one pass; ids are used as given (put
    ``<s>`` at the front of whichever part comes first). ``prefix_ids`` is the text realization t* of Def 6;
    ``memory`` is explicit memory read by every token: an ``ExplicitMemory`` (all its memories in one chunk
    that every position reads, see :func:`~mini_m3.theory.circuits.memory_kwargs`) or a ready ``MemoryKV``.
    """
    prefix, inp, out = [list(map(int, x)) for x in (prefix_ids, input_ids, output_ids)]
    if not out:
        raise ValueError("output_ids is empty: nothing to score")
    start = len(prefix) + len(inp)
    if start == 0:
        raise ValueError("need at least one token (e.g. <s>) before the outputs")
    seq = prefix + inp + out
    device = model.tok_emb.weight.device if hasattr(model, "tok_emb") else None
    idx = torch.tensor(seq[:-1], dtype=torch.long, device=device)[None]
    logits = model(idx, **memory_kwargs(memory, idx.shape[1], 1, device)).logits[0]  # (T, V)
    logp = torch.log_softmax(logits[start - 1:].double(), -1)
    tgt = torch.tensor(out, dtype=torch.long, device=logp.device)
    return logp.gather(-1, tgt[:, None])[:, 0].exp().cpu().numpy()


def summarize(probs) -> dict:
    """min / mean / product (the sequence probability of a multi-token answer) of output probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    return {"probs": p, "min": float(p.min()), "mean": float(p.mean()), "sequence": float(np.prod(p))}


# ----------------------------------------------------------------------------------------------- verdicts
def lacks(probs, threshold: float = LACKS_THRESHOLD) -> bool:
    """Def 6 (i) for one realization: some output token has probability ≤ 1/2."""
    return bool(np.min(np.asarray(probs, dtype=np.float64)) <= threshold)


def produces(probs, threshold: float = HAS_THRESHOLD) -> bool:
    """Def 6 (ii) for one realization: every output token has probability ≥ 0.9."""
    return bool(np.min(np.asarray(probs, dtype=np.float64)) >= threshold)


def knowledge_verdicts(p_plain, p_prefix=None, p_memory=None) -> dict:
    """Def 6 verdicts from output-token probabilities without help, with a text prefix, with explicit memory.

    lacks:               Def 6 (i) without help.
    separable_by_prefix: Def 6 (ii) with the realization as text prefix (None when not measured).
    separable_by_memory: Def 6 (ii) with the realization as explicit memory (None when not measured).
    separable:           (i) and (ii)-by-prefix: this model witnesses that the knowledge is separable.
    """
    out = {"lacks": lacks(p_plain),
           "separable_by_prefix": None if p_prefix is None else produces(p_prefix),
           "separable_by_memory": None if p_memory is None else produces(p_memory)}
    out["separable"] = bool(out["lacks"] and out["separable_by_prefix"])
    return out


def imitability_verdict(min_probs, plain_min) -> dict:
    """Def 7 from min_probs[a, b] = min output probability of probe b with realization a as prefix and
    plain_min[b] = the same without prefix. imitable = every probe is lacked (Def 6 (i)) and every
    (realization, probe) pair reaches 0.9 (so every realization can serve as t*)."""
    m = np.asarray(min_probs, dtype=np.float64)
    lacked = [lacks([p]) for p in np.asarray(plain_min, dtype=np.float64).ravel()]
    every_prefix = bool(m.size and (m >= HAS_THRESHOLD).all())
    return {"lacks": all(lacked), "every_prefix_supplies": every_prefix, "imitable": all(lacked) and every_prefix}


# ----------------------------------------------------------------------------------------------- with text
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def _encode_reference(tokenizer, text: str) -> list[int]:
    """A realization read as explicit memory is tokenized as the bank tokenizes references."""
    enc = getattr(tokenizer, "encode_reference", None)
    return list(enc(text)) if enc is not None else _encode(tokenizer, text)


def _realization_memory(model, ref_ids: list[int], selector: str | None) -> ExplicitMemory:
    """The realization's explicit memory, in the model's memory format unless `selector` names another one."""
    with torch.no_grad():
        return encode_reference_tokens(model, [ref_ids], selector=selector)


def _use_memory(model, use_memory: bool | None) -> bool:
    has = bool(getattr(getattr(model, "cfg", None), "memory_layers", ()))
    if use_memory and not has:
        raise ValueError("this model has no memory layers, so it cannot read explicit memory")
    return has if use_memory is None else use_memory


def knowledge_report(model, tokenizer, realization: str, probe_input: str, probe_output: str, *,
                     memory_selector: str | None = None, separator: str = "\n",
                     use_memory: bool | None = None) -> dict:
    """Def 6 for one probe of a knowledge, three ways.

    ``probe_input`` / ``probe_output`` are the probe realization t split before its associated outputs;
    each is tokenized on its own, so all three conditions score the same output tokens:

    plain:  ``<s>`` + input → output
    prefix: ``<s>`` + realization + ``separator`` (the text t*) + input → output
    memory: ``<s>`` + input → output, reading the realization's explicit memory, written in the model's memory
            format (``Memory3Config.memory_selector``, §3.3) unless ``memory_selector`` names another selector.
            Skipped when ``use_memory`` is False or the model has no memory layers.

    Returns {"plain"|"prefix"|"memory": {"probs", "min", "mean", "sequence"}, "output_ids", "input_ids",
    "prefix_ids"} plus the verdicts of :func:`knowledge_verdicts`. ``tokenizer`` needs ``encode(str)`` and
    ``bos_id``.
    """
    bos = tokenizer.bos_id
    inp, out = _encode(tokenizer, probe_input), _encode(tokenizer, probe_output)
    ref = _encode_reference(tokenizer, realization)
    prefix = [bos] + _encode(tokenizer, realization + separator)
    report = {"input_ids": inp, "output_ids": out, "prefix_ids": prefix}
    report["plain"] = summarize(output_probabilities(model, [], [bos] + inp, out))
    report["prefix"] = summarize(output_probabilities(model, prefix, inp, out))
    p_mem = None
    if _use_memory(model, use_memory):
        mem = _realization_memory(model, ref, memory_selector)
        p_mem = output_probabilities(model, [], [bos] + inp, out, memory=mem)
        report["memory"] = summarize(p_mem)
    report.update(knowledge_verdicts(report["plain"]["probs"], report["prefix"]["probs"], p_mem))
    return report


def imitability(model, tokenizer, realizations: Sequence[str], probes: Sequence[tuple[str, str]], *,
                via: str = "prefix", separator: str = "\n", memory_selector: str | None = None) -> dict:
    """Def 7: can every realization t′ serve as the prefix t* for every probe realization t?

    realizations: the texts t′ offered as help; probes: (input, output) splits of realizations t.
    via: "prefix" reads t′ as text (Def 7 as stated); "memory" reads t′ as explicit memory (Memory³'s
    version of the same question), in the model's memory format unless ``memory_selector`` says otherwise.
    Returns {"min_probs": (n_realizations, n_probes) array, "sequence_probs": same shape,
    "plain_min": (n_probes,) min probability without help} plus :func:`imitability_verdict`.
    """
    if via not in ("prefix", "memory"):
        raise ValueError(f"via must be 'prefix' or 'memory', got {via!r}")
    if via == "memory":
        _use_memory(model, True)
    bos = tokenizer.bos_id
    probe_ids = [(_encode(tokenizer, i), _encode(tokenizer, o)) for i, o in probes]
    plain_min = np.array([output_probabilities(model, [], [bos] + i, o).min() for i, o in probe_ids])
    mins = np.zeros((len(realizations), len(probes)))
    seqs = np.zeros_like(mins)
    for a, text in enumerate(realizations):
        if via == "prefix":
            prefix, mem = [bos] + _encode(tokenizer, text + separator), None
        else:
            prefix, mem = [], _realization_memory(model, _encode_reference(tokenizer, text), memory_selector)
        for b, (i, o) in enumerate(probe_ids):
            p = output_probabilities(model, prefix, i if prefix else [bos] + i, o, memory=mem)
            mins[a, b], seqs[a, b] = p.min(), np.prod(p)
    return {"min_probs": mins, "sequence_probs": seqs, "plain_min": plain_min, **imitability_verdict(mins, plain_min)}


# ----------------------------------------------------------------------------------------------- Def 4
def kind_verdict(p_original, p_stay, p_follow) -> str:
    """Def 4 from three probabilities (min over output tokens, or their means over probes):
    p_original = P(b | probe), p_stay = P(b | probe with b swapped for b′ in the context),
    p_follow = P(b′ | the same swapped probe).

    'neither' when the model lacks the behaviour (p_original ≤ 1/2, Def 6 (i)); 'abstract' when the output
    follows the context (p_follow ≥ FOLLOW_THRESHOLD); 'specific' when it stays with the input
    (p_stay ≥ STAY_THRESHOLD); 'neither' otherwise (the swap leaves the model undecided).
    """
    if lacks([p_original]):
        return "neither"
    if p_follow >= FOLLOW_THRESHOLD:
        return "abstract"
    return "specific" if p_stay >= STAY_THRESHOLD else "neither"


def _replace_subsequence(seq: list[int], old: list[int], new: list[int]) -> list[int]:
    """seq with every non-overlapping occurrence of ``old`` replaced by ``new`` (left to right)."""
    out, i = [], 0
    while i < len(seq):
        if seq[i:i + len(old)] == old:
            out += new
            i += len(old)
        else:
            out.append(seq[i])
            i += 1
    return out


def _swap_probe(tokenizer, inp, out, sub, *, reference: bool = False) -> tuple[list, list, list, list]:
    """(input ids, output ids, swapped-input ids, substitute ids) of one probe and one substitute answer.

    Text (with a tokenizer): the output text is replaced in the input text (every occurrence, also inside
    longer words), then both are tokenized, with
    ``<s>`` in front. Ids (tokenizer None): the output id run is replaced in the input ids, used as given.
    ``reference=True``: the "input" is a realization to be read as explicit memory, tokenized as the bank
    tokenizes references (no ``<s>``).
    """
    if tokenizer is None:
        inp, out, sub = [list(map(int, x)) for x in (inp, out, sub)]
        return inp, out, _replace_subsequence(inp, out, sub), sub
    swapped = inp.replace(out, sub)
    if reference:
        return _encode_reference(tokenizer, inp), _encode(tokenizer, out), _encode_reference(tokenizer, swapped), \
            _encode(tokenizer, sub)
    bos = [tokenizer.bos_id]
    return bos + _encode(tokenizer, inp), _encode(tokenizer, out), bos + _encode(tokenizer, swapped), \
        _encode(tokenizer, sub)


def knowledge_kind(model, tokenizer, probes: Sequence[tuple], *, substitutes: Sequence | None = None,
                   n_substitutes: int = 3, seed: int = 0, memory: ExplicitMemory | MemoryKV | None = None,
                   via: str = "context", memory_selector: str | None = None) -> dict:
    """Def 4 by intervention: is the behaviour input → output specific (fixed by the input) or abstract (taken
    from the context)?

    probes (``via="context"``): (input, output) pairs, each input of the form "…[a][b]…[a]" whose context already
    holds the output [b] before the cue [a]: strings with a ``tokenizer`` (``encode``, ``bos_id``; ``<s>`` is put in
    front), or id sequences with ``tokenizer=None`` (used as given). substitutes: the answers [b′] swapped in
    (same type as the outputs); default: the other probes' outputs. For each probe, up to ``n_substitutes``
    of them that differ from its output are drawn (``seed``). ``memory`` is read by every token (as in
    :func:`output_probabilities`).

    probes (``via="memory"``): (realization, input, output) triples; the realization holds the output and is
    read as explicit memory by every token of the input (in the model's memory format unless ``memory_selector``
    names another, as in :func:`knowledge_report`), and the swap [b] → [b′] is made in the realization before it
    is encoded. The input is read as text (``<s>`` in front with a tokenizer). ``memory`` must then be None.

    Returns {"per_probe": [{"original", "stay", "follow", "verdict"}], "original", "stay", "follow" (means over
    probes; each probe's "stay"/"follow" are means over its substitutes of the min over output tokens),
    "verdict" (:func:`kind_verdict` of the means), "counts" (per-probe verdicts), "thresholds", "via"}.
    """
    if via not in ("context", "memory"):
        raise ValueError(f"via must be 'context' or 'memory', got {via!r}")
    if via == "memory":
        if memory is not None:
            raise ValueError("via='memory' encodes each probe's own realization: pass memory=None")
        _use_memory(model, True)
    width = 3 if via == "memory" else 2
    probes = [tuple(p) for p in probes]
    if not probes:
        raise ValueError("probes is empty: nothing to classify")
    for k, p in enumerate(probes):
        if len(p) != width:
            raise ValueError(f"probe {k}: via={via!r} takes " + ("(realization, input, output) triples"
                                                                  if width == 3 else "(input, output) pairs"))
    pool = list(substitutes) if substitutes is not None else [p[-1] for p in probes]
    rng = np.random.default_rng(seed)
    rows = []
    for k, probe in enumerate(probes):
        real, inp, out = probe if width == 3 else (None, *probe)
        where = real if via == "memory" else inp  # the context whose copy of the output is swapped
        if tokenizer is not None and not all(isinstance(x, str) for x in probe):
            raise ValueError(f"probe {k}: with a tokenizer, input and output must be strings (tokenizer=None for ids)")
        in_context = (out in where) if tokenizer is not None else \
            _replace_subsequence(list(where), list(out), [-1]) != list(where)
        if not len(out) or not in_context:
            place = "realization" if via == "memory" else "input's context"
            raise ValueError(f"probe {k}: the output does not occur in the {place}; Def 4's test swaps it there, "
                             f"so write the probe as '…[a][b]…[a]' → '[b]'")
        others = [s for s in pool if list(s) != list(out)]
        if not others:
            raise ValueError(f"probe {k}: no substitute answer differs from its output (pass substitutes=)")
        picks = rng.choice(len(others), size=min(n_substitutes, len(others)), replace=False)
        stay, follow, original = [], [], None
        for j in picks:
            if via == "context":
                ids_in, ids_out, ids_swapped, ids_sub = _swap_probe(tokenizer, inp, out, others[j])
                mem, mem_swapped = memory, memory
            else:
                ref, ids_out, ref_swapped, ids_sub = _swap_probe(tokenizer, real, out, others[j], reference=True)
                ids_in = ids_swapped = [tokenizer.bos_id] + _encode(tokenizer, inp) if tokenizer is not None \
                    else list(map(int, inp))
                mem = _realization_memory(model, ref, memory_selector) if original is None else None
                mem_swapped = _realization_memory(model, ref_swapped, memory_selector)
            if original is None:
                original = output_probabilities(model, [], ids_in, ids_out, memory=mem).min()
            stay.append(output_probabilities(model, [], ids_swapped, ids_out, memory=mem_swapped).min())
            follow.append(output_probabilities(model, [], ids_swapped, ids_sub, memory=mem_swapped).min())
        row = {"original": float(original), "stay": float(np.mean(stay)), "follow": float(np.mean(follow))}
        row["verdict"] = kind_verdict(row["original"], row["stay"], row["follow"])
        rows.append(row)
    means = {key: float(np.mean([r[key] for r in rows])) for key in ("original", "stay", "follow")}
    return {"per_probe": rows, **means, "verdict": kind_verdict(means["original"], means["stay"], means["follow"]),
            "counts": {kind: sum(r["verdict"] == kind for r in rows) for kind in KINDS},
            "thresholds": {"lacks": LACKS_THRESHOLD, "follow": FOLLOW_THRESHOLD, "stay": STAY_THRESHOLD}, "via": via}
