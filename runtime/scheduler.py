"""The scheduler: which tokens each step computes, and what that does to the paged KV cache.

Data in, data out: `Scheduler.schedule()` returns a `StepPlan` (KV-cache operations, then the
chunks to run through the decode and prefill entries); the engine executes it and reports back
through `append_token` and `finish`. No model and no TVM, so it is tested on CPU as vLLM tests
its scheduler.

Policy (vLLM's v1 scheduler, adapted to our two entry functions):
- A sequence's tokens are its prompt, then what it generated; `num_computed` of them have K/V
  in the cache. One token left to compute is a decode; more is a prefill (a fresh prompt, or a
  preempted sequence being recomputed).
- Each step decodes every running sequence that can decode, in one batched forward, and spends
  a token budget (`max_prefill_tokens`) on prefill chunks, oldest request first, so a long
  prompt never stalls running streams. Decode and prefill run as separate forwards: the decode
  entry then always sees exactly the batch it would see without prefills, so a sequence's
  logits do not depend on what else is being prefilled.
- A waiting request is admitted, strictly first come first served, when batch slots and pages
  for its first chunk are free. It starts by forking the longest cached page-aligned prefix of
  its tokens (prefix reuse), so only the rest is prefilled.
- When pages run out, the prefix cache gives back its least recently used entries, then the
  newest running sequence is preempted: its pages are freed and it is recomputed later (prompt
  plus the tokens generated so far) ahead of requests that never ran. No request is dropped.
- `n` > 1 completions share the prompt: the leader prefills it, the others fork it once its
  last chunk is computed (TVM copies the partial last page; full pages are shared).
"""

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from relaxlm.errors import RelaxlmError


@dataclass(frozen=True)
class SchedulerConfig:
    """Sizes of the KV cache and of one step."""

    max_batch_size: int  # sequences running at once (the KV cache's batch size)
    num_pages: int  # pages in the KV cache
    page_size: int  # tokens per page
    max_prefill_tokens: int  # prompt tokens computed per step, all sequences together
    enable_prefix_cache: bool = True

    def __post_init__(self):
        for name in ("max_batch_size", "num_pages", "page_size", "max_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RelaxlmError(f"{name}={value!r} is invalid; set it to an integer >= 1")


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion of a request: the unit that owns a KV-cache sequence."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    arrival: int  # admission priority: smaller is older
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    preemptions: int = 0
    # Completions to fork from this one once its prompt is computed (n > 1, index 0 only).
    pending_forks: list["Sequence"] = field(default_factory=list)
    # Which prefix-cache namespace its prompt's pages belong to: the same tokens through
    # another LoRA adapter have other K/V (0: the base model).
    cache_key: int = 0

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.num_computed

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id}, {self.request_id}#{self.index}, {self.status.value}, "
            f"computed {self.num_computed}/{len(self.tokens)})"
        )


@dataclass(frozen=True)
class AddSeq:
    seq_id: int


@dataclass(frozen=True)
class ForkSeq:
    parent: int
    child: int
    pos: int  # the child gets the parent's first `pos` tokens


@dataclass(frozen=True)
class RemoveSeq:
    seq_id: int


KVOp = AddSeq | ForkSeq | RemoveSeq


@dataclass(eq=False)
class Chunk:
    """Tokens of one sequence computed in one forward."""

    seq: Sequence
    start: int  # position of tokens[0] in the sequence
    tokens: list[int]
    # Logits wanted: the chunk ends the sequence's known tokens, so the next token is sampled.
    wants_logits: bool
    # Sequences forked from `seq` right after this chunk; they sample from the same logits.
    forks: list[Sequence] = field(default_factory=list)


@dataclass
class StepPlan:
    """What one engine step does, in order."""

    kv_ops: list[KVOp] = field(default_factory=list)  # before the forwards
    decode: list[Chunk] = field(default_factory=list)  # one token each, decode entry
    prefill: list[Chunk] = field(default_factory=list)  # prefill entry, laid end to end
    kv_ops_after: list[KVOp] = field(default_factory=list)  # forks of computed prompts
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences that cannot get one more page even with the whole cache: finished ("length").
    out_of_pages: list[Sequence] = field(default_factory=list)
    prefix_hit_tokens: int = 0  # tokens of admitted sequences found in the prefix cache

    @property
    def chunks(self) -> list[Chunk]:
        return self.decode + self.prefill

    @property
    def empty(self) -> bool:
        return not (self.kv_ops or self.chunks or self.out_of_pages)


class PageTable:
    """Which pages each KV-cache sequence holds, mirroring TVM's PagedAttentionKVCache.

    Full pages are shared between a sequence and its forks and freed when the last holder goes;
    a fork at a position inside a page copies that page; a sequence's partial last page is its
    own, so appending never writes to a shared page.
    """

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self._pages: dict[int, list[int]] = {}
        self._length: dict[int, int] = {}

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._pages

    def length(self, seq_id: int) -> int:
        return self._length[seq_id]

    def pages_of(self, seq_id: int) -> list[int]:
        return list(self._pages[seq_id])

    def add(self, seq_id: int) -> None:
        assert seq_id not in self._pages, seq_id
        self._pages[seq_id], self._length[seq_id] = [], 0

    def fork(self, parent: int, child: int, pos: int) -> None:
        assert child not in self._pages and 0 <= pos <= self._length[parent], (parent, child, pos)
        shared = self._pages[parent][: pos // self.page_size]
        for page in shared:
            self._refs[page] += 1
        self._pages[child], self._length[child] = list(shared), pos
        if pos % self.page_size:
            self._pages[child].append(self._take())

    def fork_cost(self, pos: int) -> int:
        return 1 if pos % self.page_size else 0

    def grow(self, seq_id: int, n: int) -> None:
        for _ in range(self.grow_cost(seq_id, n)):
            self._pages[seq_id].append(self._take())
        self._length[seq_id] += n

    def grow_cost(self, seq_id: int, n: int) -> int:
        """Pages that appending n tokens takes."""
        length = self._length[seq_id]
        return _ceil_div(length + n, self.page_size) - _ceil_div(length, self.page_size)

    def room(self, seq_id: int, pages: int) -> int:
        """Tokens that fit in the sequence's last page plus `pages` new ones."""
        length = self._length[seq_id]
        return _ceil_div(length, self.page_size) * self.page_size - length + pages * self.page_size

    def shrink(self, seq_id: int, n: int) -> None:
        """Drop the last n tokens (TVM's popn): pages left empty go back, as the cache's do."""
        length = self._length[seq_id] - n
        assert 0 <= length, (seq_id, n)
        keep = _ceil_div(length, self.page_size)
        for page in self._pages[seq_id][keep:]:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)
        del self._pages[seq_id][keep:]
        self._length[seq_id] = length

    def remove(self, seq_id: int) -> None:
        for page in self._pages.pop(seq_id):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)
        del self._length[seq_id]

    def remove_gain(self, seq_id: int) -> int:
        """Pages that removing the sequence frees (those no other sequence holds)."""
        return sum(self._refs[page] == 1 for page in self._pages[seq_id])

    def pages_held_only_by(self, seq_ids: set[int]) -> int:
        """Pages that no sequence outside `seq_ids` holds."""
        outside = {p for s, pages in self._pages.items() if s not in seq_ids for p in pages}
        inside = {p for s in seq_ids for p in self._pages.get(s, ())}
        return len(inside - outside)

    def _take(self) -> int:
        assert self._free, "the plan exceeded the KV cache; the scheduler's accounting is wrong"
        page = self._free.pop()
        self._refs[page] = 1
        return page


class PrefixCache:
    """Page-aligned prompt prefixes kept in the KV cache for reuse: a trie of token blocks.

    Each node is one page of tokens; its `owner` is a cached KV sequence whose tokens start with
    the node's whole path, so a request matching the path forks the owner at the path's end.
    """

    class _Node:
        __slots__ = ("block", "parent", "children", "owner", "depth")

        def __init__(self, block: tuple[int, ...], parent, owner: int | None):
            self.block, self.parent, self.owner = block, parent, owner
            self.depth = 0 if parent is None else parent.depth + 1
            self.children: dict[tuple[int, ...], PrefixCache._Node] = {}

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._roots: dict[int, PrefixCache._Node] = {}  # one trie per cache key
        self._owned: dict[int, list[PrefixCache._Node]] = {}  # owner -> nodes it holds
        self._last_use: dict[int, int] = {}
        self._clock = itertools.count()

    @property
    def owners(self) -> list[int]:
        """Cached sequences, least recently used first."""
        return sorted(self._owned, key=self._last_use.__getitem__)

    def _root(self, key: int) -> "PrefixCache._Node":
        return self._roots.setdefault(key, self._Node((), None, None))

    def match(self, tokens: list[int], limit: int, key: int = 0) -> tuple[int | None, int]:
        """(owner to fork, tokens matched): the longest cached prefix of at most `limit` tokens
        (under cache key `key`: the K/V of one LoRA adapter, 0 the base model's)."""
        node, owner, matched = self._root(key), None, 0
        for block in self._blocks(tokens[:limit]):
            node = node.children.get(block)
            if node is None:
                break
            owner, matched = node.owner, matched + self.page_size
        if owner is not None:
            self._last_use[owner] = next(self._clock)
        return owner, matched

    def new_blocks(self, tokens: list[int], key: int = 0) -> int:
        """How many of the full pages of `tokens` are not cached yet."""
        node, blocks = self._root(key), self._blocks(tokens)
        for i, block in enumerate(blocks):
            node = node.children.get(block)
            if node is None:
                return len(blocks) - i
        return 0

    def insert(self, tokens: list[int], owner: int, key: int = 0) -> None:
        """Record that sequence `owner` holds the full pages of `tokens` (some may be new)."""
        node, nodes = self._root(key), []
        for block in self._blocks(tokens):
            child = node.children.get(block)
            if child is None:
                child = node.children[block] = self._Node(block, node, owner)
                nodes.append(child)
            node = child
        assert nodes, "insert only what new_blocks says is new"
        self._owned[owner] = nodes
        self._last_use[owner] = next(self._clock)

    def evict(self, owner: int) -> None:
        """Forget `owner`; its nodes that longer cached paths pass through go to their owners."""
        # Deepest first, so a node's children are settled before the node itself.
        for node in sorted(self._owned.pop(owner), key=lambda n: -n.depth):
            if node.children:
                heir = next(iter(node.children.values())).owner
                node.owner = heir
                self._owned[heir].append(node)
            else:
                del node.parent.children[node.block]
        del self._last_use[owner]

    def _blocks(self, tokens: list[int]) -> list[tuple[int, ...]]:
        p = self.page_size
        return [tuple(tokens[i : i + p]) for i in range(0, len(tokens) - p + 1, p)]


class Scheduler:
    """Requests in, step plans out; see the module docstring for the policy."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.pages = PageTable(config.num_pages, config.page_size)
        self.prefix_cache = PrefixCache(config.page_size) if config.enable_prefix_cache else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self._arrivals = itertools.count()

    # -- requests in ------------------------------------------------------------------------

    def add(
        self, request_id: str, tokens: list[int], n: int = 1, cache_key: int = 0
    ) -> list[Sequence]:
        """Queue a request for `n` completions of `tokens`; returns its sequences by index.
        cache_key: the prefix-cache namespace of its K/V (from its LoRA adapter's load and its
        M-RoPE shift; 0 for none)."""
        self.check(tokens, n)
        arrival = next(self._arrivals)
        seqs = [
            Sequence(next(self._ids), request_id, i, list(tokens), len(tokens), arrival)
            for i in range(n)
        ]
        for seq in seqs:
            seq.cache_key = cache_key
        seqs[0].pending_forks = seqs[1:]
        self.waiting.append(seqs[0])
        return seqs

    def check(self, tokens: list[int], n: int = 1) -> None:
        """Raise unless a request for `n` completions of `tokens` can ever run."""
        if not tokens:
            raise RelaxlmError("the prompt is empty; pass at least one token")
        if n > self.config.max_batch_size:
            raise RelaxlmError(
                f"SamplingParams.n={n} exceeds the engine's max_batch_size="
                f"{self.config.max_batch_size}; lower n or raise max_batch_size"
            )
        p = self.config.page_size
        needed = _ceil_div(len(tokens), p) + (n - 1) * self.pages.fork_cost(len(tokens))
        if needed > self.config.num_pages:
            raise RelaxlmError(
                f"the prompt ({len(tokens)} tokens, n={n}) needs {needed} KV-cache pages of {p} "
                f"tokens each ({needed * p} tokens) but the cache holds {self.config.num_pages} "
                f"pages ({self.config.num_pages * p} tokens); raise kv_cache_tokens or shorten "
                "the prompt"
            )

    def max_new_tokens(self, prompt_len: int, n: int = 1) -> int:
        """The most tokens each of `n` completions of a `prompt_len`-token prompt can generate
        with the whole KV cache to itself: the prompt's pages shared, then each completion's
        own pages (a partly filled prompt page copied). 0 if even the prompt does not fit."""
        p, total = self.config.page_size, self.config.num_pages

        def fits(new: int) -> bool:
            own = _ceil_div(new, p) + 1 if n > 1 else 0
            return _ceil_div(prompt_len + new, p) + (n - 1) * own <= total

        low, high = 0, total * p + 1  # fits(low) unless nothing does; never fits(high)
        if not fits(0):
            return 0
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def append_token(self, seq: Sequence, token: int) -> None:
        """The engine sampled `token` for `seq` from the logits of its last chunk."""
        assert seq.status is Status.RUNNING and seq.remaining == 0, seq
        seq.tokens.append(int(token))

    def extend(self, seq: Sequence, n: int) -> int:
        """Take pages for up to n draft tokens after the token `seq` computes this step
        (speculative decoding), from free pages only; how many fit. `accept_drafts` settles."""
        assert seq.status is Status.RUNNING and seq.remaining == 0, seq
        n = max(0, min(n, self.pages.room(seq.seq_id, self.pages.free_pages)))
        self.pages.grow(seq.seq_id, n)
        return n

    def release_drafts(self, seq: Sequence, n: int) -> None:
        """Give back the pages of n tokens taken with `extend` (drafts not made, or rejected)."""
        assert 0 <= n <= self.pages.length(seq.seq_id) - seq.num_computed, (seq, n)
        self.pages.shrink(seq.seq_id, n)

    def accept_drafts(self, seq: Sequence, drafted: int, tokens: list[int]) -> None:
        """Verification of `drafted` draft tokens (taken with `extend`) chose `tokens`: the
        accepted drafts, then one of the target's own. The accepted drafts' K/V stay; the engine
        pops the rejected ones from the KV cache, as this does from the page table."""
        keep = len(tokens) - 1  # accepted drafts; the last token is computed next step
        assert seq.remaining == 0 and 0 <= keep <= drafted, (seq, drafted, tokens)
        seq.tokens += [int(t) for t in tokens]
        self.release_drafts(seq, drafted - keep)
        seq.num_computed += keep

    def finish(self, seq: Sequence) -> list[KVOp]:
        """`seq` is done: cache its computed full pages for reuse, then free it."""
        ops: list[KVOp] = []
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            ops += self._cache_prefix(seq, seq.num_computed)
            ops.append(self._remove(seq.seq_id))
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._mark_finished(seq)
        return ops

    def abort(self, request_id: str) -> list[KVOp]:
        """Finish every sequence of the request at once, caching nothing; the KV ops to run."""
        ops: list[KVOp] = []
        for seq in [s for s in self.running if s.request_id == request_id]:
            self.running.remove(seq)
            ops.append(self._remove(seq.seq_id))
            self._mark_finished(seq)
        for seq in [s for s in self.waiting if s.request_id == request_id]:
            self.waiting.remove(seq)
            self._mark_finished(seq)
        return ops

    def reserve(self, seq_id: int, n: int) -> tuple[list[KVOp], bool]:
        """Take pages for n tokens of a sequence the engine runs outside the plans (scoring),
        evicting cached prefixes as needed. Returns the evictions, which must run even when
        the pages could not be taken, and whether they were."""
        plan = StepPlan()
        self.pages.add(seq_id)
        while self.pages.grow_cost(seq_id, n) > self.pages.free_pages:
            if not self._evict_one(plan, set()):
                self.pages.remove(seq_id)
                return plan.kv_ops, False
        self.pages.grow(seq_id, n)
        return plan.kv_ops, True

    def release(self, seq_id: int) -> None:
        """Give back the pages of a sequence taken with `reserve`."""
        self.pages.remove(seq_id)

    # -- state ------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a batch slot (the completions of queued n > 1 requests too)."""
        return sum(1 + len(s.pending_forks) for s in self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def cached_pages(self) -> int:
        """Pages held only by the prefix cache (given back on demand)."""
        if self.prefix_cache is None:
            return 0
        return self.pages.pages_held_only_by(set(self.prefix_cache.owners))

    def new_seq_id(self) -> int:
        """A KV-cache sequence id that no scheduled sequence uses, for work outside the plans."""
        return next(self._ids)

    def decoding(self) -> bool:
        """Whether a running sequence waits for its next token (a step's length delays it)."""
        return any(seq.remaining == 1 for seq in self.running)

    # -- one step ---------------------------------------------------------------------------

    def schedule(self, prefill_budget: int | None = None) -> StepPlan:
        """Plan one step and commit it to the page table: the engine must run the whole plan.

        prefill_budget: prompt tokens this step may compute (at most config.max_prefill_tokens,
            which is the default).
        """
        plan = StepPlan()
        scheduled: set[int] = set()
        budget = self.config.max_prefill_tokens
        if prefill_budget is not None:
            budget = max(1, min(prefill_budget, budget))
        for seq in sorted(self.running, key=_priority):
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            want = 1 if seq.remaining == 1 else min(seq.remaining, budget)
            if want == 0:  # no prefill budget left this step
                continue
            n = self._reserve_running(seq, want, plan, scheduled)
            if n:
                if want > 1:
                    budget -= n
                self._plan_chunk(seq, n, plan)
                scheduled.add(seq.seq_id)
            elif len(self.running) == 1:
                # Alone, with the prefix cache emptied, and not one page for it: its tokens
                # exceed the whole cache (a recomputed sequence can), so its length is capped.
                self.running.remove(seq)
                plan.kv_ops.append(self._remove(seq.seq_id))
                self._mark_finished(seq)
                plan.out_of_pages.append(seq)
            elif want == 1:  # a decode cannot wait a step holding its pages: others may need them
                self._preempt(seq, plan)
        if not plan.preempted:  # admitting while preempting would only thrash
            self._admit(plan, budget)
        # Prompts computed by this step's forwards go into the prefix cache only now, so that no
        # admission above forks K/V that do not exist yet.
        for chunk in plan.chunks:
            if chunk.wants_logits and chunk.seq.num_generated == 0:
                plan.kv_ops_after += self._cache_prefix(chunk.seq, chunk.seq.num_computed)
        return plan

    def _admit(self, plan: StepPlan, budget: int) -> None:
        pinned: set[int] = set()  # cached prefixes forked this step stay
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if self.num_running + 1 + len(seq.pending_forks) > self.config.max_batch_size:
                return
            # With its cached prefix if that fits; else without it, which lets the cache give
            # back that prefix's pages too.
            for use_cache in (True, False):
                admitted = self._try_admit(seq, plan, budget, pinned, use_cache)
                if admitted or self.prefix_cache is None:
                    break
            if admitted:
                budget -= admitted
            elif not self.running and seq.num_generated:
                # Even the empty cache cannot hold a chunk of this recomputed sequence: it grew
                # too long before it was preempted, so its length is capped.
                self.waiting.popleft()
                self._mark_finished(seq)
                plan.out_of_pages.append(seq)
            else:  # wait for pages; strictly first come, first served
                return

    def _try_admit(self, seq, plan: StepPlan, budget: int, pinned: set[int], use_cache) -> int:
        """Admit `seq` with a first chunk that fits whole; its length, or 0."""
        owner, hit = None, 0
        if use_cache and self.prefix_cache is not None:
            # Recompute at least the last token: its logits choose the next one.
            owner, hit = self.prefix_cache.match(seq.tokens, len(seq.tokens) - 1, seq.cache_key)
        if owner is None:
            self.pages.add(seq.seq_id)
        else:
            self.pages.fork(owner, seq.seq_id, hit)  # page-aligned: takes no page
        want = min(len(seq.tokens) - hit, budget)
        keep = pinned | ({owner} if owner is not None else set())
        while self._fitting(seq, want) < want and self._evict_one(plan, keep):
            pass
        if self._fitting(seq, want) < want:
            self.pages.remove(seq.seq_id)
            return 0
        if owner is not None:
            pinned.add(owner)
        self.waiting.popleft()
        seq.status, seq.num_computed = Status.RUNNING, hit
        self.running.append(seq)
        plan.kv_ops.append(AddSeq(seq.seq_id) if owner is None else ForkSeq(owner, seq.seq_id, hit))
        plan.prefix_hit_tokens += hit
        self._plan_chunk(seq, want, plan)
        return want

    def _reserve_running(self, seq: Sequence, want: int, plan: StepPlan, scheduled) -> int:
        """How many of `want` tokens of a running sequence fit (0 if none), after evicting
        cached prefixes and then preempting newer sequences as needed."""
        while True:
            n = self._fitting(seq, want)
            if n == want:
                return n
            if self._evict_one(plan, set()):
                continue
            victims = [
                s
                for s in self.running
                if s.seq_id not in scheduled
                and s.remaining > 0  # just forked this step: sampling from this step's logits
                and _priority(s) > _priority(seq)
            ]
            if not victims:
                return n
            self._preempt(max(victims, key=_priority), plan)

    def _fitting(self, seq: Sequence, want: int) -> int:
        """The longest chunk of at most `want` tokens whose pages are free now."""
        free = self.pages.free_pages
        n = min(want, self.pages.room(seq.seq_id, free))
        if n > 0 and self._completes(seq, n) and seq.pending_forks:
            forks = len(seq.pending_forks) * self.pages.fork_cost(len(seq.tokens))
            if self.pages.grow_cost(seq.seq_id, n) + forks > free:
                n -= 1  # the forks wait for the last token's step
        return n

    def _completes(self, seq: Sequence, n: int) -> bool:
        return self.pages.length(seq.seq_id) + n == len(seq.tokens)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        plan.kv_ops.append(self._remove(seq.seq_id))
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.preemptions += 1
        # Ahead of requests that never ran, behind older preempted sequences.
        at = 0
        while (
            at < len(self.waiting)
            and self.waiting[at].preemptions > 0
            and _priority(self.waiting[at]) < _priority(seq)
        ):
            at += 1
        self.waiting.insert(at, seq)
        plan.preempted.append(seq)

    def _evict_one(self, plan: StepPlan, pinned: set[int]) -> bool:
        """Drop the least recently used cached prefix that holds pages no one else holds."""
        if self.prefix_cache is None:
            return False
        for owner in self.prefix_cache.owners:
            if owner not in pinned and self.pages.remove_gain(owner) > 0:
                self.prefix_cache.evict(owner)
                plan.kv_ops.append(self._remove(owner))
                return True
        return False

    def _remove(self, seq_id: int) -> RemoveSeq:
        self.pages.remove(seq_id)
        return RemoveSeq(seq_id)

    def _mark_finished(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        for child in seq.pending_forks:  # never forked: they end with their leader
            child.status = Status.FINISHED
        seq.pending_forks = []

    def _plan_chunk(self, seq: Sequence, n: int, plan: StepPlan) -> None:
        """Add n tokens of `seq` to the plan and take their pages at once, so that the next
        decision sees them taken."""
        start = self.pages.length(seq.seq_id)
        assert start == seq.num_computed, seq
        chunk = Chunk(seq, start, seq.tokens[start : start + n], start + n == len(seq.tokens))
        # Every single token that wants logits goes through the decode entry, so a sequence's
        # decode steps run the same kernels whatever else the step computes.
        (plan.decode if n == 1 and chunk.wants_logits else plan.prefill).append(chunk)
        self.pages.grow(seq.seq_id, n)
        seq.num_computed = start + n
        if not chunk.wants_logits:
            return
        for child in seq.pending_forks:
            self.pages.fork(seq.seq_id, child.seq_id, seq.num_computed)
            plan.kv_ops_after.append(ForkSeq(seq.seq_id, child.seq_id, seq.num_computed))
            child.status, child.num_computed = Status.RUNNING, seq.num_computed
            child.tokens = list(seq.tokens)
            self.running.append(child)
        chunk.forks, seq.pending_forks = seq.pending_forks, []

    def _cache_prefix(self, seq: Sequence, length: int) -> list[KVOp]:
        """Fork the full pages of seq.tokens[:length] into the prefix cache if any are new."""
        cache = self.prefix_cache
        if cache is None:
            return []
        aligned = length - length % self.config.page_size
        if aligned == 0 or cache.new_blocks(seq.tokens[:aligned], seq.cache_key) == 0:
            return []
        owner = next(self._ids)
        self.pages.fork(seq.seq_id, owner, aligned)  # page-aligned: shares, takes no page
        cache.insert(seq.tokens[:aligned], owner, seq.cache_key)
        return [ForkSeq(seq.seq_id, owner, aligned)]


def _priority(seq: Sequence) -> tuple[int, int]:
    """Older requests first; a request's completions in index order."""
    return seq.arrival, seq.seq_id


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
