"""The scheduler and the engine loop with no model: a fake runner whose next token is the
previous one plus one, and a codec that spells token i as one letter. As vLLM's scheduler
tests do, every decision is checked step by step."""

from __future__ import annotations

import string

import numpy as np
import pytest

from service.engine.core import EngineCore
from service.engine.output import OutputProcessor
from service.engine.params import Event, GenerationRequest, QueueFull
from service.engine.runner import PADDING_LIMIT, Chunk, plan_calls
from service.engine.scheduler import Scheduler, Sequence

VOCAB = 26
EOS = 25  # "z"


class LetterCodec:
    def encode(self, text: str) -> list[int]:
        return [string.ascii_lowercase.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(string.ascii_lowercase[i] for i in ids)


class CountingRunner:
    """Logits that make the next token the last one plus one; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []
        self.released: list[int] = []
        self.fail_next = False

    def logits(self, last: list[int]) -> np.ndarray:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the model broke")
        rows = np.zeros((len(last), VOCAB), dtype=np.float32)
        rows[np.arange(len(last)), (np.array(last) + 1) % VOCAB] = 1.0
        return rows

    def run(self, chunks: list[Chunk]) -> list[np.ndarray]:
        """One step: each chunk as (slot, start, end)."""
        self.calls.append(("run", [(c.slot, c.start, c.start + len(c.token_ids)) for c in chunks]))
        return [
            self.logits(list(c.token_ids[-1:] if not c.every_position else c.token_ids))
            for c in chunks
        ]

    def release(self, slot: int) -> None:
        self.released.append(slot)

    def fork(self, source: int, target: int, tokens: int) -> None:
        self.calls.append(("fork", [source, target, tokens]))


def sequence(prompt: str, max_tokens: int = 8, **options: object) -> Sequence:
    request = GenerationRequest(prompt=prompt, temperature=0, **options)
    return Sequence(request, LetterCodec().encode(prompt), max_tokens)


def scheduler(slots: int = 2, budget: int = 100, queue: int = 8, prefill: int = 512) -> Scheduler:
    return Scheduler(slots, EOS, budget, queue, prefill)


def test_admission_is_first_come_first_served_within_slots_and_budget() -> None:
    s = scheduler(slots=2, budget=30)
    first, second, third = sequence("abc", 10), sequence("abcd", 10), sequence("a", 2)
    s.add([first, second, third])
    plan = s.schedule()
    # 13 + 14 reserved of 30: the third (3) would fit the budget, but no slot is free.
    assert [seq for seq, _, _ in plan.chunks] == [first, second]
    assert s.reserved == 27 and list(s.waiting) == [third]
    second.prefilled = 4  # what the engine core records after running the chunk
    s.finish(first, "length")
    assert s.schedule().chunks == [(third, 0, 1)] and third.slot == 0


def test_a_head_that_does_not_fit_the_budget_is_not_overtaken() -> None:
    s = scheduler(slots=4, budget=30)
    running, big, small = sequence("abc", 10), sequence("abcd", 20), sequence("a", 1)
    s.add([running, big, small])
    assert s.schedule().chunks == [(running, 0, 3)]  # big needs 24 of the 17 left; small waits
    assert list(s.waiting) == [big, small]


def test_a_long_prompt_is_prefilled_in_chunks_of_the_steps_budget() -> None:
    s = scheduler(slots=4, prefill=4)
    long, other = sequence("abcdefghij"), sequence("abc")
    s.add([long, other])
    plan = s.schedule()
    assert (plan.chunks, list(s.waiting)) == ([(long, 0, 4)], [other])
    long.prefilled = 4  # what the engine core records after running the chunk
    assert s.schedule().chunks == [(long, 4, 8)] and list(s.waiting) == [other]
    long.prefilled = 8
    # The rest of the long prompt, then what is left of the budget to the next one.
    assert s.schedule().chunks == [(long, 8, 10), (other, 0, 2)]


def test_a_step_is_one_call_unless_padding_would_cost_more() -> None:
    decoding = [Chunk(slot, [1], 10) for slot in range(4)]
    short = Chunk(5, list(range(8)), 0)  # slot 4 sits the step out
    assert plan_calls([*decoding, short], context=64) == [[*decoding, short]]
    long = Chunk(6, list(range(PADDING_LIMIT)), 0)
    assert plan_calls([*decoding, short, long], context=4096) == [decoding, [short, long]]
    # A row near the end of the context has no room for the padded width.
    late = Chunk(0, [1], 60)
    assert plan_calls([late, short], context=64) == [[late], [short]]


def test_a_full_queue_refuses() -> None:
    s = scheduler(queue=2)
    s.add([sequence("a")])
    with pytest.raises(QueueFull):
        s.add([sequence("b"), sequence("b")])  # all of a request's samples, or none
    assert len(s.waiting) == 1


def test_cancelling_a_waiting_sequence_is_immediate_and_a_running_one_at_the_next_step() -> None:
    s = scheduler(slots=1)
    running, waiting = sequence("a"), sequence("b")
    s.add([running])
    s.schedule()
    s.add([waiting])
    assert s.abort(waiting) and waiting.finish_reason == "cancelled" and not s.waiting
    assert not s.abort(running) and running.slot == 0  # still holds its slot ...
    plan = s.schedule()
    assert plan.cancelled == [running] and s.slots == [None] and s.reserved == 0
    assert plan.released == [0]  # nothing of it was in the cache yet: nothing to keep


def samples(prompt: str, n: int, max_tokens: int = 8) -> list[Sequence]:
    first = sequence(prompt, max_tokens)
    return [first] + [
        Sequence(first.request, first.prompt_ids, max_tokens, i, first) for i in range(1, n)
    ]


def test_samples_of_one_prompt_are_prefilled_once() -> None:
    s = scheduler(slots=4, prefill=3)
    first, *forks = samples("abc", 3)
    s.add([first, *forks])
    plan = s.schedule()
    # The prompt uses the whole prefill cap, but its forks cost no prefill.
    assert plan.chunks == [(first, 0, 3)] and plan.forks == forks
    assert s.reserved == 3 * first.reserved


def test_a_sample_whose_first_left_the_queue_is_prefilled_itself() -> None:
    s = scheduler(slots=1)
    s.add([sequence("z")])
    s.schedule()  # the only slot is taken
    first, fork = samples("abc", 2)
    s.add([first, fork])
    assert s.abort(first)
    s.finish(s.slots[0], "length")
    plan = s.schedule()
    assert plan.chunks == [(fork, 0, 3)] and plan.forks == []


def test_token_level_stops() -> None:
    s = scheduler()
    seq = sequence("a", max_tokens=2)
    assert s.update_from_output(seq, EOS) == "stop" and seq.generated == []
    assert s.update_from_output(seq, 3) is None
    assert s.update_from_output(seq, 4) == "length" and seq.generated == [3, 4]
    ignoring = sequence("a", max_tokens=3, ignore_eos=True)
    assert s.update_from_output(ignoring, EOS) is None and ignoring.generated == [EOS]


def kept(core: EngineCore, slot: int) -> int:
    """Tokens a free slot keeps for prompts that start as its sequence did."""
    return len(core.scheduler.prefix_cache.kept[slot][0])


def engine(slots: int = 2) -> tuple[EngineCore, CountingRunner, dict[Sequence, list[Event]]]:
    runner = CountingRunner()
    core = EngineCore(runner, scheduler(slots=slots), OutputProcessor(LetterCodec(), "fake"))
    return core, runner, {}


def submit(core: EngineCore, events: dict[Sequence, list[Event]], seq: Sequence) -> Sequence:
    events[seq] = []
    core.submit([seq], [events[seq].append])
    return seq


def text(events: list[Event]) -> str:
    return "".join(e.text for e in events)


def test_sequences_join_and_leave_a_running_batch_at_every_step() -> None:
    core, runner, events = engine(slots=2)
    long = submit(core, events, sequence("a", max_tokens=6))
    core.step()  # prefill "a" -> b
    assert long.generated == [1]
    short = submit(core, events, sequence("k", max_tokens=2))
    core.step()  # short joins while long is running: its prompt and long's token, one call
    assert runner.calls[-1] == ("run", [(1, 0, 1), (0, 1, 2)])
    core.step()
    assert long.finish_reason is None and long.generated == [1, 2, 3]
    assert short.finish_reason == "length" and text(events[short]) == "lm"
    # Its slot keeps "kl" (the last token never went in) for a prompt that starts so.
    assert runner.released == [] and kept(core, 1) == 2
    for _ in range(3):
        core.step()
    assert long.finish_reason == "length" and text(events[long]) == "bcdefg"
    assert [e.finish_reason for e in events[long]][-1] == "length"
    assert core.scheduler.slots == [None, None] and kept(core, 0) == 6


def test_forked_samples_copy_the_prompts_cache_and_decode_with_it() -> None:
    core, runner, events = engine(slots=3)
    group = samples("ab", 3, max_tokens=3)
    for seq in group:
        events[seq] = []
    core.submit(group, [events[seq].append for seq in group])
    core.step()
    assert runner.calls[:3] == [("run", [(0, 0, 2)]), ("fork", [0, 1, 2]), ("fork", [0, 2, 2])]
    core.step()
    core.step()
    assert [text(events[seq]) for seq in group] == ["cde"] * 3


def test_decoding_goes_on_while_a_long_prompt_is_prefilled_in_chunks() -> None:
    runner = CountingRunner()
    core = EngineCore(runner, scheduler(slots=2, prefill=3), OutputProcessor(LetterCodec(), "f"))
    events: dict[Sequence, list[Event]] = {}
    short = submit(core, events, sequence("b", max_tokens=6))
    core.step()
    long = submit(core, events, sequence("abcdefg", max_tokens=2))
    core.step()
    core.step()
    # Every step decodes the short one; the long prompt goes in 3 + 3 + 1 tokens beside it.
    assert runner.calls[1:] == [
        ("run", [(1, 0, 3), (0, 1, 2)]),
        ("run", [(1, 3, 6), (0, 2, 3)]),
    ]
    core.step()
    assert runner.calls[-1] == ("run", [(1, 6, 7), (0, 3, 4)])
    core.step()
    assert long.prefilled == 7 and text(events[long]) == "hi"
    assert short.generated == [2, 3, 4, 5, 6]


def test_end_token_and_stop_strings_across_tokens() -> None:
    core, _, events = engine()
    ends = submit(core, events, sequence("w", max_tokens=10))  # x, y, then z: the end token
    stopped = submit(core, events, sequence("c", max_tokens=10, stop=["fg"]))
    for _ in range(4):
        core.step()
    assert (text(events[ends]), ends.finish_reason) == ("xy", "stop")
    assert (text(events[stopped]), stopped.finish_reason) == ("de", "stop")
    # "f" was held back while it could start "fg", so it was never sent.
    assert all("f" not in e.text for e in events[stopped])


def test_a_failing_step_fails_only_its_sequences_and_the_next_request_is_served() -> None:
    core, runner, events = engine()
    broken = submit(core, events, sequence("a"))
    runner.fail_next = True
    core.step_safely()
    assert broken.finish_reason == "error" and events[broken][-1].finish_reason == "error"
    later = submit(core, events, sequence("a", max_tokens=3))
    for _ in range(3):
        core.step()
    assert (text(events[later]), later.finish_reason) == ("bcd", "length")


SHARED = "abcdefghijklmnopqrst"  # 20 tokens: longer than the shortest prefix worth reusing


def test_a_prompt_that_starts_as_a_finished_one_did_takes_its_slot_and_prefills_the_rest() -> None:
    core, runner, events = engine(slots=2)
    first = submit(core, events, sequence(SHARED, max_tokens=2))
    core.step()  # prefill: "u"
    core.step()  # decode: "v"; the slot keeps the prompt and "u"
    assert first.finish_reason == "length" and kept(core, 0) == 21
    again = submit(core, events, sequence(SHARED + "uvw", max_tokens=2))
    core.step()
    assert runner.calls[-1] == ("run", [(0, 21, 23)])
    core.step()
    assert (again.reused, text(events[again])) == (21, "xy")
    assert kept(core, 0) == 24


def test_a_prompt_that_starts_as_a_running_one_copies_that_part_of_its_cache() -> None:
    core, runner, events = engine(slots=2)
    running = submit(core, events, sequence(SHARED, max_tokens=8))
    core.step()
    joining = submit(core, events, sequence(SHARED + "k", max_tokens=2))
    core.step()
    assert runner.calls[-2:] == [("fork", [0, 1, 20]), ("run", [(1, 20, 21), (0, 20, 21)])]
    core.step()
    assert text(events[joining]) == "lm" and running.finish_reason is None


def test_without_copies_only_a_free_slots_own_tokens_are_reused() -> None:
    core, runner, events = engine(slots=3)
    core.scheduler.can_copy = False  # as on a GPU
    running = submit(core, events, sequence(SHARED, max_tokens=8))
    core.step()
    joining = submit(core, events, sequence(SHARED + "k", max_tokens=2))
    core.step()
    assert runner.calls[-1] == ("run", [(1, 0, 21), (0, 20, 21)])
    assert joining.reused == 0 and running.finish_reason is None


def test_short_shared_starts_and_prompt_logprobs_are_prefilled_whole() -> None:
    core, runner, events = engine(slots=2)
    submit(core, events, sequence(SHARED, max_tokens=1))
    core.step()
    short = submit(core, events, sequence(SHARED[:15] + "z", max_tokens=1))
    scored = submit(core, events, sequence(SHARED + "k", max_tokens=1, prompt_logprobs=0))
    calls = len(runner.calls)
    core.step()
    # Neither reuses a cached start (too short; scores need every position run): both whole.
    assert runner.calls[calls:] == [("run", [(1, 0, 16), (0, 0, 21)])]
    assert short.reused == scored.reused == 0
    scores = scored.prompt_logprobs
    assert scores[0].logprob is None and [e.token_id for e in scores] == scored.prompt_ids
    # Each letter but the last is the one the fake model predicts: likelier than "k".
    assert len({e.logprob for e in scores[1:-1]}) == 1 and scores[-1].logprob < scores[1].logprob


def test_kept_tokens_count_against_the_kv_budget() -> None:
    s = scheduler(slots=2, budget=40)
    kept = sequence(SHARED, max_tokens=2)
    s.add([kept])
    s.schedule()
    kept.prefilled, kept.generated = 20, [20, 21]
    assert s.finish(kept, "length") == -1 and s.prefix_cache.tokens == 21
    s.add([sequence("bcdefghijk", max_tokens=10)])  # reserves 20: 41 would be over 40
    plan = s.schedule()
    assert plan.chunks[0][0].slot == 1  # a slot that keeps nothing is taken first
    assert plan.released == [0] and s.prefix_cache.tokens == 0


def test_a_failed_steps_cache_is_not_kept() -> None:
    core, runner, events = engine()
    broken = submit(core, events, sequence(SHARED))
    runner.fail_next = True
    core.step_safely()
    assert broken.finish_reason == "error" and runner.released == [0]
    assert core.scheduler.prefix_cache.tokens == 0


def test_priority_policy_admits_lower_priority_first_and_fcfs_keeps_arrival_order() -> None:
    def order(policy: str) -> list[str]:
        s = Scheduler(1, EOS, 100, 8, 512, policy=policy)
        seqs = [sequence(p, 2, priority=r) for p, r in [("a", 5), ("b", 0), ("c", 5), ("d", -1)]]
        s.add(seqs[:1])
        s.add(seqs[1:2])
        s.add(seqs[2:3])
        s.add(seqs[3:])
        admitted = []
        while s.waiting:
            [(seq, _, _)] = s.schedule().chunks
            admitted.append(LetterCodec().decode(seq.prompt_ids))
            s.finish(seq, "length")
        return admitted

    assert order("priority") == ["d", "b", "a", "c"]  # ties: first come first
    assert order("fcfs") == ["a", "b", "c", "d"]


def test_a_requests_samples_stay_together_in_the_priority_queue() -> None:
    s = Scheduler(4, EOS, 100, 8, 512, policy="priority")
    s.add([sequence("a", 2, priority=1)])
    first = sequence("b", 2, priority=0)
    fork = Sequence(first.request, first.prompt_ids, 2, 1, first)
    s.add([first, fork])
    assert list(s.waiting)[:2] == [first, fork]


def test_stop_token_ids_end_a_sequence_as_the_end_token_does() -> None:
    s = scheduler()
    seq = sequence("a", max_tokens=5, stop_token_ids=[4])
    assert s.update_from_output(seq, 3) is None
    assert s.update_from_output(seq, 4) == "stop" and seq.generated == [3]


def test_min_tokens_masks_the_end_token_and_stop_ids_until_reached() -> None:
    core, _, events = engine()
    # The fake model's next token is the last plus one: "x", "y" then "z", the end token.
    plain = submit(core, events, sequence("w", max_tokens=10))
    held = submit(core, events, sequence("w", max_tokens=10, min_tokens=4))
    by_id = submit(core, events, sequence("c", max_tokens=10, stop_token_ids=[4], min_tokens=1))
    for _ in range(6):
        core.step()
    assert (text(events[plain]), plain.finish_reason) == ("xy", "stop")
    # "z" masked at the third token: the likeliest other one ("a") comes instead.
    assert text(events[held]).startswith("xy") and "z" not in text(events[held])[:3]
    assert len(held.generated) >= 4
    assert (text(events[by_id]), by_id.finish_reason) == ("d", "stop")


def test_include_stop_str_in_output_keeps_the_stop_string() -> None:
    core, _, events = engine()
    kept = submit(core, events, sequence("c", 10, stop=["fg"], include_stop_str_in_output=True))
    cut = submit(core, events, sequence("c", 10, stop=["fg"]))
    for _ in range(5):
        core.step()
    assert (text(events[kept]), kept.finish_reason) == ("defg", "stop")
    assert (text(events[cut]), cut.finish_reason) == ("de", "stop")
