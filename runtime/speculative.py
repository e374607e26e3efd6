"""Speculative decoding: a drafter proposes a few tokens, the target model scores them all in one
forward, and the acceptance rule keeps the tokens the target would have produced.

Two drafters:
- `ngram_draft` (prompt lookup): find the sequence's last n tokens earlier in the sequence and
  propose the tokens that followed them. No model; pays off on text that repeats its context
  (code edits, quoting, summaries).
- `DraftModel`: a smaller artifact with the same vocabulary, decoding K tokens ahead in a KV
  cache of its own that follows the target's sequences (caught up and rolled back each step).

`accept_token` is the rule for one drafted position (Leviathan et al. 2023, Chen et al. 2023):
accept draft x with probability min(1, p(x) / q(x)), else draw from normalize(max(0, p - q)).
Whatever q is, the accepted-or-resampled token is distributed as p, so speculation changes
speed, never the output distribution. p is the sampler's own distribution after penalties,
temperature and filters (one-hot for greedy, so greedy accepts exactly the target's argmax); an
n-gram draft is a deterministic proposal, q one-hot.
"""

from dataclasses import dataclass

import numpy as np

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.model import CompiledModel
from relaxlm.runtime.sampler import Sampler, draw, processed_distribution

NGRAM = "ngram"
MAX_NGRAM = 3  # longest suffix matched; longer matches predict better but rarely exist


def ngram_draft(tokens: list[int], k: int, max_n: int = MAX_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` (n <= max_n); [] if even the last token never occurred before.

    A match close to the end continues periodically (the proposal copies its own first
    tokens), so a loop of period 2 still yields k tokens.
    """
    length = len(tokens)
    if k < 1 or length < 2:
        return []
    arr = np.asarray(tokens)
    # Earlier positions holding the last token, latest first: candidate ends of a match.
    ends = np.flatnonzero(arr[:-1] == arr[-1])[::-1]
    if not len(ends):
        return []
    best = int(ends[0])
    for n in range(min(max_n, length - 1), 1, -1):
        suffix = arr[length - n :]
        hit = next(
            (e for e in ends if e >= n - 1 and (arr[e - n + 1 : e + 1] == suffix).all()), None
        )
        if hit is not None:
            best = int(hit)
            break
    extended = list(tokens)
    for j in range(k):
        extended.append(extended[best + 1 + j])  # best + 1 + j < len(extended): always known
    return extended[length:]


def accept_token(
    p: np.ndarray, draft: int, q: np.ndarray | None, rng: np.random.Generator
) -> tuple[bool, int]:
    """One drafted position: (accepted, the token the sequence takes).

    p: the target's distribution [vocab]; q: the drafter's [vocab], None for a deterministic
    proposal (one-hot at `draft`). Accept with probability min(1, p[x] / q[x]); on rejection draw
    from normalize(max(0, p - q)), which puts no mass on a rejected one-hot draft.
    """
    q_x = 1.0 if q is None else float(q[draft])
    p_x = float(p[draft])
    if q_x > 0 and rng.random() * q_x < p_x:  # u < p/q without dividing by a tiny q
        return True, draft
    residual = p.astype(np.float64, copy=True)
    if q is None:
        residual[draft] = 0.0
    else:
        residual = np.maximum(residual - q, 0.0)
    if not residual.sum() > 0:  # p <= q everywhere only when p == q: then x was accepted
        residual = p.astype(np.float64, copy=True)
    return False, draw(residual, rng)


@dataclass
class Verdict:
    """What verification decided for one sequence: the tokens it takes (the accepted drafts,
    then one token of the target's own) and how many drafts were accepted."""

    tokens: list[int]
    accepted: int


def verify(rows: np.ndarray, drafts: list[int], qs: np.ndarray | None, sampler: Sampler) -> Verdict:
    """Acceptance over a sequence's verification rows.

    rows: the target's logits [len(drafts) + 1, vocab], row i scoring the token after draft i-1
        (row 0 after the last accepted token). qs: the drafter's distributions [len(drafts),
        vocab], or None for deterministic drafts. The sampler records each token it takes, so
        the penalties of row i see the tokens taken before it, as plain decoding would.
    """
    tokens = []
    for i, draft in enumerate(drafts):
        p = processed_distribution(rows[i], sampler)
        ok, token = accept_token(p, draft, None if qs is None else qs[i], sampler.rng)
        sampler.record(token)
        tokens.append(token)
        if not ok:
            return Verdict(tokens, i)
    token = draw(processed_distribution(rows[len(drafts)], sampler), sampler.rng)
    sampler.record(token)
    return Verdict(tokens + [token], len(drafts))


class NgramDrafter:
    """Prompt lookup as a drafter: no model and no state of its own."""

    def propose(self, requests):
        """(ngram_draft(tokens, k), None) for each (seq_id, tokens, k, sampler)."""
        return [(ngram_draft(tokens, k), None) for _, tokens, k, _ in requests]

    def forget_except(self, seq_ids: set[int]) -> None:
        pass

    def rollback(self, seq_id: int, accepted: int, k: int) -> None:
        pass

    def clear(self) -> None:
        pass


class DraftModel:
    """A draft artifact that follows the target's sequences in its own KV cache.

    Its cache holds, per sequence, a prefix of the sequence's tokens; `propose` catches it up
    (prefill of the tokens it lacks), then decodes k - 1 drafts more, and `rollback` drops the
    drafts verification rejected.
    """

    def __init__(self, model: CompiledModel):
        self.model = model
        self._length: dict[int, int] = {}  # seq_id -> tokens in the draft cache

    def forget_except(self, seq_ids: set[int]) -> None:
        """Drop the draft sequences of sequences that ended or were preempted."""
        for seq_id in [s for s in self._length if s not in seq_ids]:
            self.model.remove_sequence(seq_id)
            del self._length[seq_id]

    def clear(self) -> None:
        self.model.clear()
        self._length.clear()

    def fits(self, seq_id: int, tokens: int, k: int) -> bool:
        """Whether the cache has pages for a sequence of `tokens` tokens plus k - 1 drafts."""
        have = self._length.get(seq_id, 0)
        p = self.model.page_size
        need = -(-(tokens + k - 1) // p) - -(-have // p)
        return need <= self.model.free_pages() - 1  # TVM keeps a spare page

    def propose(
        self, requests: list[tuple[int, list[int], int, Sampler]]
    ) -> list[tuple[list[int], np.ndarray | None]]:
        """(drafts, their distributions or None for greedy) for each (seq_id, tokens, k,
        sampler); sampled requests draw from the draft's distribution with the sampler's
        generator. A sequence the draft cache has no pages for gets no drafts."""
        m, p = self.model, self.model.page_size
        free = m.free_pages() - 1  # TVM keeps a spare page
        fitting = []
        for request in requests:
            seq_id, tokens, k, _ = request
            have = self._length.get(seq_id, 0)
            need = -(-(len(tokens) + k - 1) // p) - -(-have // p)
            if need <= free and len(tokens) + k <= m.context_window:
                free -= need
                fitting.append(request)
        proposed = dict(zip([r[0] for r in fitting], self._propose(fitting), strict=True))
        return [proposed.get(seq_id, ([], None)) for seq_id, _, _, _ in requests]

    def _propose(self, requests):
        m = self.model
        for seq_id, _, _, _ in requests:
            if seq_id not in self._length:
                m.add_sequence(seq_id)
                self._length[seq_id] = 0
        # Catch up: every token the draft cache lacks, in forwards of at most prefill_chunk.
        logits: dict[int, np.ndarray] = {}
        todo = {seq_id: tokens[self._length[seq_id] :] for seq_id, tokens, _, _ in requests}
        while todo:
            batch, budget = [], m.prefill_chunk
            for seq_id, rest in todo.items():
                if budget == 0 or len(batch) == m.max_batch_size:
                    break
                batch.append((seq_id, rest[:budget]))
                budget -= len(batch[-1][1])
            out = m.prefill([s for s, _ in batch], [c for _, c in batch])
            for (seq_id, chunk), row in zip(batch, out, strict=True):
                self._length[seq_id] += len(chunk)
                todo[seq_id] = todo[seq_id][len(chunk) :]
                if not todo[seq_id]:
                    del todo[seq_id]
                    logits[seq_id] = row
        # Then k tokens each: draft j comes from the logits after draft j - 1.
        drafts: dict[int, list[int]] = {seq_id: [] for seq_id, _, _, _ in requests}
        qs: dict[int, list[np.ndarray]] = {seq_id: [] for seq_id, _, _, _ in requests}
        live = list(requests)
        while live:
            for seq_id, _, _, sampler in live:
                row = logits[seq_id]
                if sampler.params.temperature == 0:
                    drafts[seq_id].append(int(np.argmax(row)))
                else:
                    q = processed_distribution(row, sampler, penalties=False)
                    drafts[seq_id].append(draw(q, sampler.rng))
                    qs[seq_id].append(q)
            live = [r for r in live if len(drafts[r[0]]) < r[2]]
            if live:
                ids = [r[0] for r in live]
                out = m.decode(ids, [drafts[s][-1] for s in ids])
                for seq_id, row in zip(ids, out, strict=True):
                    self._length[seq_id] += 1
                    logits[seq_id] = row
        return [
            (drafts[seq_id], np.stack(qs[seq_id]) if qs[seq_id] else None)
            for seq_id, _, _, _ in requests
        ]

    def rollback(self, seq_id: int, accepted: int, k: int) -> None:
        """Verification accepted `accepted` of the k drafts: the draft cache keeps the drafts it
        computed (the first k - 1) up to the first rejected one."""
        pop = (k - 1) - min(accepted, k - 1)
        if pop:
            self.model.popn(seq_id, pop)
            self._length[seq_id] -= pop


def check_draft_vocabulary(target_vocab: dict, draft_vocab: dict, target_size, draft_size, path):
    """RelaxlmError unless the draft model reads and writes the target's token ids."""
    if target_size != draft_size or target_vocab != draft_vocab:
        raise RelaxlmError(
            f"draft_model={str(path)!r} has another vocabulary (logits {draft_size} wide, "
            f"tokenizer of {len(draft_vocab)} tokens) than the target (logits {target_size} wide, "
            f"{len(target_vocab)} tokens); pass a draft model with the same tokenizer, or "
            f"draft_model={NGRAM!r}"
        )
