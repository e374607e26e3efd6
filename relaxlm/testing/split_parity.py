"""A model split some way (layers across devices, heads across tensor-parallel shards) against
the same checkpoint compiled whole: the same logits through every KV-cache operation."""

from __future__ import annotations

import numpy as np


def assert_split_equals_whole(whole, split, atol: float, decode_steps: int) -> float:
    """`whole` and `split` (CompiledModels of one checkpoint) give the same logits within
    `atol` through a prefill of three prompts in one forward, `decode_steps` batched decode
    steps, then a fork cut mid-page, popn and remove, a prefill and a decode of what is left;
    and keep the same pages free. Returns the largest difference."""
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(5, whole.vocab_size, n).tolist()] for n in (20, 6, 37)]
    worst = 0.0

    def both(call, *args):
        nonlocal worst
        a, b = getattr(whole, call)(*args), getattr(split, call)(*args)
        assert a.shape == b.shape
        worst = max(worst, float(np.abs(a - b).max()))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol)
        return a

    for m in (whole, split):
        for seq in range(3):
            m.add_sequence(seq)
    logits = both("prefill", [0, 1, 2], prompts)
    for _ in range(decode_steps):  # every sequence at its own length
        logits = both("decode", [0, 1, 2], logits.argmax(-1).tolist())
    for m in (whole, split):  # the KV operations reach every part of the split cache
        m.fork_sequence(0, 3, 13)  # a page cut mid-way: copied in each cache
        m.popn(2, 3)
        m.remove_sequence(1)
    both("prefill", [3, 2], [[9, 10, 11], [12]])
    both("decode", [0, 3, 2], [5, 6, 7])
    assert whole.free_pages() == split.free_pages()
    assert worst < atol
    return worst
