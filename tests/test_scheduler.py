"""The scheduler, page table and prefix cache on plain data: no model, no TVM.

`FakeKV` plays the KV cache: it applies each plan's operations and chunks to per-sequence token
lists and checks that every chunk starts where its sequence ends, that a fork copies its
parent's tokens, and that a sequence asking for logits holds exactly its tokens. A workload
that passes those checks generates what a real model would.
"""

import random

import pytest

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.scheduler import (
    AddSeq,
    ForkSeq,
    PageTable,
    PrefixCache,
    RemoveSeq,
    Scheduler,
    SchedulerConfig,
    Status,
    StepPlan,
)

PAGE = 4


def make(
    max_batch_size=4, num_pages=64, max_prefill_tokens=64, prefix_cache=True
) -> tuple[Scheduler, "FakeKV"]:
    config = SchedulerConfig(max_batch_size, num_pages, PAGE, max_prefill_tokens, prefix_cache)
    return Scheduler(config), FakeKV(num_pages)


class FakeKV:
    """Token lists per sequence, and a page count kept as TVM keeps it."""

    def __init__(self, num_pages: int):
        self.tokens: dict[int, list[int]] = {}
        self.pages = PageTable(num_pages, PAGE)  # an independent replay of the same rules

    def run(self, ops):
        for op in ops:
            if isinstance(op, AddSeq):
                assert op.seq_id not in self.tokens
                self.tokens[op.seq_id] = []
                self.pages.add(op.seq_id)
            elif isinstance(op, ForkSeq):
                assert op.child not in self.tokens and op.pos <= len(self.tokens[op.parent])
                self.tokens[op.child] = self.tokens[op.parent][: op.pos]
                self.pages.fork(op.parent, op.child, op.pos)
            else:
                assert isinstance(op, RemoveSeq)
                del self.tokens[op.seq_id]
                self.pages.remove(op.seq_id)

    def step(self, plan: StepPlan):
        """Run a plan; returns the chunks that want logits."""
        self.run(plan.kv_ops)
        for chunk in plan.decode:
            assert len(chunk.tokens) == 1
        for chunk in plan.chunks:
            held = self.tokens[chunk.seq.seq_id]
            assert len(held) == chunk.start, (chunk.seq, len(held), chunk.start)
            assert held == chunk.seq.tokens[: chunk.start]
            held += chunk.tokens
            self.pages.grow(chunk.seq.seq_id, len(chunk.tokens))
            if chunk.wants_logits:
                assert held == chunk.seq.tokens
        self.run(plan.kv_ops_after)
        return [c for c in plan.chunks if c.wants_logits]


def next_token(seq) -> int:
    """A deterministic 'model': the next token depends on the sequence's tokens only."""
    return (sum(seq.tokens) * 31 + len(seq.tokens) * 7 + seq.index) % 1000


def drive(scheduler: Scheduler, kv: FakeKV, max_tokens: dict[str, int], steps=10_000):
    """Run to completion like the engine; returns {(request, index): generated tokens}."""
    out = {}
    for _ in range(steps):
        if not scheduler.has_work():
            return out
        plan = scheduler.schedule()
        for chunk in kv.step(plan):
            for seq in (chunk.seq, *chunk.forks):
                scheduler.append_token(seq, next_token(seq))
                if seq.num_generated >= max_tokens[seq.request_id]:
                    kv.run(scheduler.finish(seq))
                    out[seq.request_id, seq.index] = seq.tokens[seq.prompt_len :]
        for seq in plan.out_of_pages:
            out[seq.request_id, seq.index] = seq.tokens[seq.prompt_len :]
        assert kv.pages.free_pages == scheduler.pages.free_pages
    raise AssertionError("the workload did not finish")


def expected(prompt: list[int], n_tokens: int, index: int = 0) -> list[int]:
    class S:
        tokens = list(prompt)

    S.index = index
    for _ in range(n_tokens):
        S.tokens.append(next_token(S))
    return S.tokens[len(prompt) :]


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


# -- page table ---------------------------------------------------------------------------------


def test_page_table_shares_full_pages_and_copies_a_cut_page():
    t = PageTable(10, PAGE)
    t.add(0)
    t.grow(0, 10)  # pages: [4][4][2]
    assert t.free_pages == 7
    t.fork(0, 1, 10)  # shares two full pages, copies the partial third
    assert t.free_pages == 6
    assert t.pages_of(1)[:2] == t.pages_of(0)[:2] and t.pages_of(1)[2] != t.pages_of(0)[2]
    t.fork(0, 2, 8)  # page-aligned: no page taken
    assert t.free_pages == 6 and t.pages_of(2) == t.pages_of(0)[:2]
    assert t.grow_cost(2, 1) == 1 and t.grow_cost(0, 2) == 0 and t.grow_cost(0, 3) == 1
    assert t.remove_gain(0) == 1  # only its partial page is its own
    t.remove(0)
    assert t.free_pages == 7
    t.remove(1)
    assert t.free_pages == 8  # the second page is still held by sequence 2
    t.remove(2)
    assert t.free_pages == 10


# -- prefix cache -------------------------------------------------------------------------------


def test_prefix_cache_matches_whole_pages_and_reassigns_on_evict():
    c = PrefixCache(PAGE)
    a = list(range(12))
    c.insert(a, owner=100)  # 3 pages
    assert c.match(a + [99], limit=13) == (100, 12)
    assert c.match(a, limit=11) == (100, 8)  # at most `limit` tokens
    assert c.match([0, 1, 2, 3, 9, 9, 9, 9], limit=8) == (100, 4)
    assert c.match([5, 5, 5, 5], limit=4) == (None, 0)
    b = a[:8] + [7, 7, 7, 7, 8, 8, 8, 8]  # branches after two pages
    assert c.new_blocks(b) == 2
    c.insert(b, owner=200)
    assert c.match(b, limit=16) == (200, 16)
    c.evict(100)  # its first two pages lie on 200's path: they now belong to 200
    assert c.match(a, limit=12) == (200, 8)
    assert c.owners == [200]
    c.evict(200)
    assert c.match(a, limit=12) == (None, 0) and c.owners == []


# -- scheduling ---------------------------------------------------------------------------------


def test_running_sequences_decode_together_while_a_long_prompt_prefills_in_chunks():
    s, kv = make(max_prefill_tokens=8)
    for i in range(3):
        s.add(f"short{i}", prompt(i, 3))
    plan = s.schedule()
    assert [len(c.tokens) for c in plan.prefill] == [3, 3, 2]  # budget 8, the last one cut
    for chunk in kv.step(plan):
        s.append_token(chunk.seq, 1)
    s.add("long", prompt(9, 30))
    sizes = []
    while any(seq.request_id == "long" for seq in s.waiting) or any(
        seq.request_id == "long" and seq.remaining > 1 for seq in s.running
    ):
        plan = s.schedule()
        for chunk in kv.step(plan):
            s.append_token(chunk.seq, 1)
        decoding = [c.seq.request_id for c in plan.decode]
        sizes.append([len(c.tokens) for c in plan.prefill if c.seq.request_id == "long"])
        assert {"short0", "short1"} <= set(decoding)  # never stalled by the long prompt
    assert sum(sum(x) for x in sizes) == 30 and max(max(x, default=0) for x in sizes) <= 8


def test_admission_is_first_come_first_served_within_max_batch_size():
    s, kv = make(max_batch_size=2)
    for i in range(5):
        s.add(f"r{i}", prompt(i, 5))
    plan = s.schedule()
    assert [c.seq.request_id for c in plan.prefill] == ["r0", "r1"]
    assert s.num_waiting == 3 and s.num_running == 2
    for chunk in kv.step(plan):
        s.append_token(chunk.seq, next_token(chunk.seq))
    out = drive(s, kv, {f"r{i}": 6 for i in range(5)})
    assert out == {(f"r{i}", 0): expected(prompt(i, 5), 6) for i in range(5)}


def test_pages_running_out_preempts_the_newest_and_recomputes_it():
    # 12 pages of 4 tokens; each request ends at 8 + 20 = 28 tokens = 7 pages.
    s, kv = make(max_batch_size=4, num_pages=12, prefix_cache=False)
    for i in range(4):
        s.add(f"r{i}", prompt(i, 8))
    preempted = []
    original_schedule = s.schedule

    def schedule():
        plan = original_schedule()
        preempted.extend(seq.request_id for seq in plan.preempted)
        return plan

    s.schedule = schedule
    out = drive(s, kv, {f"r{i}": 20 for i in range(4)})
    assert out == {(f"r{i}", 0): expected(prompt(i, 8), 20) for i in range(4)}
    assert preempted and "r0" not in preempted  # the oldest is never the victim
    assert s.pages.free_pages == 12


def test_random_workloads_finish_with_correct_tokens():
    """Tight caches, shared prefixes, n > 1, tiny budgets: preemption, eviction, forks, caps."""
    rng = random.Random(5)
    seen = {"preempted": 0, "hit": 0, "capped": 0, "forked": 0}
    for trial in range(300):
        pages = rng.randint(6, 40)
        s, kv = make(
            max_batch_size=rng.randint(1, 6),
            num_pages=pages,
            max_prefill_tokens=rng.choice([1, 3, 8, 64]),
            prefix_cache=rng.random() < 0.7,
        )
        shared = prompt(1000 + trial, rng.choice([0, 4, 9]))
        max_tokens, prompts, ns = {}, {}, {}
        for i in range(rng.randint(1, 8)):
            r = f"r{i}"
            prompts[r] = shared + prompt(trial * 100 + i, rng.randint(1, 12))
            max_tokens[r] = rng.randint(1, 16)
            ns[r] = min(rng.choice([1, 1, 1, 2, 3]), s.config.max_batch_size)
            try:
                s.add(r, prompts[r], ns[r])
            except RelaxlmError:  # the prompt alone needs more pages than the cache has
                del prompts[r]
        schedule = s.schedule

        def counting_schedule(schedule=schedule):
            plan = schedule()
            seen["preempted"] += len(plan.preempted)
            seen["hit"] += plan.prefix_hit_tokens
            seen["capped"] += len(plan.out_of_pages)
            seen["forked"] += sum(len(c.forks) for c in plan.chunks)
            return plan

        s.schedule = counting_schedule
        out = drive(s, kv, max_tokens)
        for r, p in prompts.items():
            for index in range(ns[r]):
                got, want = out[r, index], expected(p, max_tokens[r], index)
                # Only a sequence that outgrows the whole cache stops early ("length").
                assert got and got == want[: len(got)], (trial, r, index, got, want)
                if len(got) < len(want):
                    assert len(p) + len(got) > (pages - 1) * PAGE, (trial, r, index)
        assert s.pages.free_pages + s.cached_pages == pages, trial  # nothing leaked
    assert all(seen.values()), seen  # every path was exercised


def test_prefix_reuse_forks_the_cached_prefix_and_prefills_only_the_rest():
    s, kv = make()
    shared = prompt(0, 10)  # two full pages and a half
    s.add("a", shared + [1, 2, 3])
    drive(s, kv, {"a": 3})
    s.add("b", shared + [7, 8])
    plan = s.schedule()
    (chunk,) = plan.prefill
    assert plan.prefix_hit_tokens == 8 and chunk.start == 8 and chunk.tokens == shared[8:] + [7, 8]
    assert isinstance(plan.kv_ops[0], ForkSeq) and plan.kv_ops[0].pos == 8
    for chunk in kv.step(plan):  # FakeKV checks the forked tokens are b's
        s.append_token(chunk.seq, 1)
    # A prompt equal to a cached one still computes its last token (its logits are needed).
    s2, kv2 = make()
    s2.add("a", prompt(1, 8))
    drive(s2, kv2, {"a": 1})
    s2.add("b", prompt(1, 8))
    plan = s2.schedule()
    assert plan.prefix_hit_tokens == 4 and plan.prefill[0].tokens == prompt(1, 8)[4:]


def test_n_completions_fork_after_the_prompt_and_share_its_pages():
    s, kv = make(num_pages=20)
    seqs = s.add("r", prompt(0, 10), n=3)
    plan = s.schedule()
    (chunk,) = plan.prefill
    assert chunk.wants_logits and chunk.forks == seqs[1:]
    forks = [op for op in plan.kv_ops_after if op.child in {q.seq_id for q in seqs}]
    assert [(op.parent, op.pos) for op in forks] == [(seqs[0].seq_id, 10)] * 2
    kv.step(plan)
    # 3 pages of prompt, plus one copied partial page per fork.
    assert s.pages.free_pages == 20 - 3 - 2
    assert all(q.status is Status.RUNNING for q in seqs)
    for q in seqs:
        s.append_token(q, 5)
    out = drive(s, kv, {"r": 4})
    assert sorted(out) == [("r", 0), ("r", 1), ("r", 2)]


def test_cache_gives_back_pages_before_anyone_is_preempted():
    s, kv = make(max_batch_size=2, num_pages=8)
    s.add("a", prompt(0, 16))  # 4 pages, cached when done
    drive(s, kv, {"a": 1})
    assert s.cached_pages == 4 and s.pages.free_pages == 4
    s.add("b", prompt(1, 24))  # 6 pages: two cached prefixes must go
    plan = s.schedule()
    assert not plan.preempted and plan.prefill[0].tokens == prompt(1, 24)
    assert any(isinstance(op, RemoveSeq) for op in plan.kv_ops)


def test_abort_frees_pages_at_once():
    s, kv = make(prefix_cache=False)
    s.add("a", prompt(0, 9), n=2)
    s.add("b", prompt(1, 5))
    kv.step(s.schedule())
    assert s.pages.free_pages < 64
    kv.run(s.abort("a"))
    kv.run(s.abort("b"))
    assert s.pages.free_pages == 64 and not s.has_work()


def test_a_sequence_outgrowing_the_whole_cache_is_capped():
    s, kv = make(num_pages=3, prefix_cache=False)  # 12 tokens in all
    s.add("a", prompt(0, 5))
    out = drive(s, kv, {"a": 100})
    assert len(out["a", 0]) == 12 - 5 + 1  # the last token sampled is never stored


def test_requests_that_can_never_run_are_refused():
    s, _ = make(max_batch_size=2, num_pages=4)
    with pytest.raises(RelaxlmError, match=r"SamplingParams\.n=3"):
        s.add("a", [1, 2, 3], n=3)
    with pytest.raises(RelaxlmError, match="kv_cache_tokens"):
        s.add("a", list(range(17)))
    # Pages and tokens are named as such (it said "4 of 4 tokens", meaning 4 pages of 4 tokens).
    with pytest.raises(RelaxlmError, match=r"5 KV-cache pages of 4 tokens each \(20 tokens\) "):
        s.add("a", list(range(17)))
    with pytest.raises(RelaxlmError, match=r"holds 4 pages \(16 tokens\)"):
        s.add("a", list(range(17)))
    with pytest.raises(RelaxlmError, match="empty"):
        s.add("a", [])
    with pytest.raises(RelaxlmError, match="max_prefill_tokens=0"):
        SchedulerConfig(1, 1, 1, 0)


def test_max_new_tokens_is_what_the_cache_can_ever_hold():
    s, _ = make(max_batch_size=4, num_pages=8)  # 8 pages of 4 tokens: 32 tokens
    assert s.max_new_tokens(10) == 22
    # n=2: 18 tokens take 5 pages; the second completion's own 8 tokens 2 pages, plus its copy
    # of the prompt's half-full last page: 8 pages. One more token needs a ninth.
    assert s.max_new_tokens(10, n=2) == 8
    assert s.max_new_tokens(32) == 0 and s.max_new_tokens(33) == 0


def test_the_prefill_budget_follows_the_step_latency_target():
    from relaxlm.runtime.prefill_budget import MIN_ADAPTIVE_TOKENS, PrefillBudget

    budget = PrefillBudget(cap=1024, step_target_s=0.1)
    assert budget.tokens(decoding=True) == 1024  # nothing measured yet
    budget.observe(1024, 0.512)  # 0.5 ms a token: 200 fit in 0.1 s
    assert budget.tokens(decoding=True) == 200
    assert budget.tokens(decoding=False) == 1024  # nobody waits: the fastest prefill
    for _ in range(30):  # a slower phase: the running cost follows it
        budget.observe(100, 0.5)
    assert budget.tokens(decoding=True) == MIN_ADAPTIVE_TOKENS  # 20 fit: the floor holds
    assert PrefillBudget(cap=16, step_target_s=1e-9, seconds_per_token=1.0).tokens(True) == 16
    fixed = PrefillBudget(cap=64, step_target_s=None, seconds_per_token=1.0)
    assert fixed.tokens(decoding=True) == 64
