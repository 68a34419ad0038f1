"""The batched sampler: greedy rows, seeded reproducibility, top-k/top-p cuts, distribution."""

from __future__ import annotations

import torch

from loraplane.engine.sampler import sample
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.sequence import Sequence


def seqs_for(params: list[SamplingParams], outputs: int = 0) -> list[Sequence]:
    return [Sequence(f"r{i}", [1, 2, 3], p, output_ids=[5] * outputs)
            for i, p in enumerate(params)]


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(5, 97, generator=torch.Generator().manual_seed(0))
    got = sample(logits, seqs_for([SamplingParams(temperature=0.0)] * 5))
    assert got == logits.argmax(-1).tolist()


def test_seeded_rows_do_not_depend_on_their_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=gen)
    params = [SamplingParams(temperature=0.8, seed=11), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.3, top_k=20, seed=12),
              SamplingParams(temperature=1.0, top_p=0.7, seed=13),
              SamplingParams(temperature=0.5, top_k=5, top_p=0.9, seed=14),
              SamplingParams(temperature=1.0, seed=11)]
    together = sample(logits, seqs_for(params))
    assert together == sample(logits, seqs_for(params))  # reproducible
    alone = [sample(logits[i:i + 1], seqs_for([p]))[0] for i, p in enumerate(params)]
    assert together == alone
    # The output index is part of the key: the next token of the same request differs in law.
    later = [sample(logits, seqs_for(params, outputs=k))[0] for k in range(8)]
    assert len(set(later)) > 1


def test_unseeded_rows_draw_their_own_seed_once() -> None:
    logits = torch.randn(1, 1000)
    seq = seqs_for([SamplingParams(temperature=1.0)])
    first = sample(logits, seq)
    assert seq[0].sample_seed is not None
    assert sample(logits, seq) == first


def test_top_k_and_top_p_cut_the_tail() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    k2 = sample(logits, [Sequence(f"k{i}", [1], SamplingParams(top_k=2, seed=i))
                         for i in range(200)])
    assert set(k2) == {0, 1}
    # softmax mass of token 0 is 0.64; top_p 0.5 keeps it alone.
    p = sample(logits, [Sequence(f"p{i}", [1], SamplingParams(top_p=0.5, seed=i))
                        for i in range(200)])
    assert set(p) == {0}
    p2 = sample(logits, [Sequence(f"q{i}", [1], SamplingParams(top_p=0.8, seed=i))
                         for i in range(200)])
    assert set(p2) == {0, 1}


def test_frequencies_follow_the_softmax() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = probs.log()[None, :].repeat(n, 1)
    got = sample(logits, [Sequence(f"s{i}", [1], SamplingParams(seed=i)) for i in range(n)])
    freq = torch.bincount(torch.tensor(got), minlength=4).float() / n
    # Four standard errors at n = 4000 are below 0.032 for every p here.
    assert (freq - probs).abs().max() < 0.032, freq
