"""The generation engine (runner, scheduler, sampling, streaming), without BentoML."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from artifacts import ModelConfig
from service.engine.llm_engine import (
    Event,
    Generation,
    GenerationRequest,
    LLMEngine,
    QueueFull,
    RequestError,
    collector,
)
from service.engine.runner import Chunk, ModelRunner, plan_calls
from service.engine.text import IncrementalDecoder, TextCodec

PROMPTS = [
    "Clean text beats more text",
    "用自己的文字训练一个模型",
    "The",
    "When the validation loss stops falling while the training loss keeps falling, the model",
]


def greedy(prompt: str | list[int], max_new_tokens: int = 24, **extra: object) -> GenerationRequest:
    return GenerationRequest(**helpers.greedy(prompt, max_new_tokens, **extra))


@pytest.fixture
def fp32(fp32_engine: LLMEngine) -> LLMEngine:
    return fp32_engine


@pytest.fixture(params=["fp32", "int8"])
def engine(request: pytest.FixtureRequest, export_dir: Path) -> LLMEngine:
    """Each variant's shared engine (`export_dir` for conftest's `model` marker)."""
    return request.getfixturevalue(f"{request.param}_engine")


@pytest.fixture(scope="module")
def single(export_dir: Path) -> Iterator[LLMEngine]:
    """int8, one slot, a queue of one, a KV budget of 200 tokens."""
    options = {"max_running": 1, "max_queue": 1, "max_batch_total_tokens": 200}
    with LLMEngine(export_dir, "int8", threads=2, **options) as engine:
        yield engine


def transformers_greedy(run_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.eos_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(new))
    return texts


def test_greedy_equals_transformers_alone_and_in_a_continuous_batch(
    run_dir: Path, fp32: LLMEngine
) -> None:
    lengths = [24, 6, 40, 11]
    expected = [
        transformers_greedy(run_dir, [p], n)[0] for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    alone = [fp32.generate([greedy(p, n)])[0].text for p, n in zip(PROMPTS, lengths, strict=True)]
    assert alone == expected
    # A long request runs; the others join after its 4th token (3 slots: the last one waits
    # for a slot, which frees when the 6-token request leaves), and all leave while it runs.
    first_events: list[Event] = []
    started = threading.Event()

    def on_event(event: Event) -> None:
        first_events.append(event)
        if len(first_events) == 4:
            started.set()

    long_seq = fp32.submit(greedy(PROMPTS[2], 200, ignore_eos=True), on_event)
    assert started.wait(30)
    joined = fp32.generate([greedy(p, n) for p, n in zip(PROMPTS, lengths, strict=True)])
    assert long_seq.finish_reason is None and len(long_seq.generated) < 200  # still running
    assert [g.text for g in joined] == expected
    while first_events[-1].finish_reason is None:
        threading.Event().wait(0.01)
    assert first_events[-1].completion_tokens == 200


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: LLMEngine) -> None:
    sampled = GenerationRequest(
        prompt="The",
        max_new_tokens=16,
        temperature=1.0,
        top_p=0.9,
        top_k=50,
        repetition_penalty=1.3,
        seed=7,
    )
    alone = engine.generate([sampled])[0].text
    in_batch = engine.generate([greedy(PROMPTS[0]), sampled, greedy(PROMPTS[1], 3)])[1].text
    assert alone == in_batch
    others = {engine.generate([sampled.model_copy(update={"seed": s})])[0].text for s in range(6)}
    assert len(others) > 1  # sampling does sample


def test_top_k_one_is_greedy_and_repetition_penalty_repeats_less(fp32: LLMEngine) -> None:
    plain = fp32.generate([greedy("The", 40, ignore_eos=True)])[0]
    top1 = GenerationRequest(prompt="The", max_new_tokens=40, top_k=1, seed=3, ignore_eos=True)
    assert fp32.generate([top1])[0].text == plain.text
    penalized = fp32.generate([greedy("The", 40, ignore_eos=True, repetition_penalty=2.0)])[0]
    codec = fp32.codec
    assert len(set(codec.encode(penalized.text))) > len(set(codec.encode(plain.text)))


def test_stop_strings_eos_and_length_end_with_their_finish_reason(fp32: LLMEngine) -> None:
    full = fp32.generate([greedy(PROMPTS[0], 30, ignore_eos=True)])[0]
    assert full.finish_reason == "length" and full.completion_tokens == 30
    stop = full.text[3:5]
    cut = fp32.generate([greedy(PROMPTS[0], 30, ignore_eos=True, stop=["zzz-never", stop])])[0]
    assert (cut.text, cut.finish_reason) == (full.text[: full.text.index(stop)], "stop")
    streamed = "".join(e.text for e in fp32.stream(greedy(PROMPTS[0], 30, stop=[stop])))
    assert streamed == cut.text  # a stop string's first characters are held back, never sent
    # EOS: make the model's own next token the end-of-text token.
    done = threading.Event()
    seq = fp32.submit(greedy(PROMPTS[0], 2), lambda e: e.finish_reason and done.set())
    assert done.wait(30)
    first = seq.generated[0]
    scheduler = fp32.scheduler
    eos, scheduler.eos_token_id = scheduler.eos_token_id, first
    try:
        ended = fp32.generate([greedy(PROMPTS[0], 30)])[0]
    finally:
        scheduler.eos_token_id = eos
    assert (ended.text, ended.completion_tokens, ended.finish_reason) == ("", 0, "stop")


def test_cancel_frees_the_slot_within_one_step(single: LLMEngine) -> None:
    engine = single
    stream = engine.stream(greedy("The", 150, ignore_eos=True))
    produced_at_cancel = next(stream).completion_tokens
    stream.close()  # leaving the loop cancels, as a disconnected client does
    assert engine.scheduler.slots == [None]  # at once: the caller may exit now
    waiting = engine.generate([greedy("Clean", 5, ignore_eos=True)])[0]  # gets the only slot
    assert waiting.completion_tokens == 5
    assert engine.scheduler.slots == [None]
    events: list[Event] = []
    seq = engine.submit(greedy("The", 150, ignore_eos=True), events.append)
    while not events:
        threading.Event().wait(0.005)
    at_cancel = events[-1].completion_tokens
    engine.cancel(seq)
    while seq.finish_reason is None:
        threading.Event().wait(0.005)
    assert seq.finish_reason == "cancelled"
    assert events[-1].completion_tokens - at_cancel <= 1 and produced_at_cancel < 150


def test_a_full_queue_refuses_and_bad_requests_say_what_to_change(single: LLMEngine) -> None:
    engine = single
    started = threading.Event()
    running = engine.submit(greedy("The", 150, ignore_eos=True), lambda e: started.set())
    assert started.wait(30)  # running, so the next one waits in the queue
    queued = engine.submit(greedy("The", 150, ignore_eos=True), lambda e: None)
    with pytest.raises(QueueFull):
        engine.submit(greedy("The"), lambda e: None)
    engine.cancel(queued)  # a waiting request leaves the queue at once
    assert queued.finish_reason == "cancelled"
    replacement = engine.submit(greedy("The"), lambda e: None)
    engine.cancel(replacement)
    engine.cancel(running)
    with pytest.raises(RequestError, match="context is 256 tokens"):
        engine.submit(greedy("word " * 400), lambda e: None)
    with pytest.raises(RequestError, match="KV budget of 200"):
        engine.submit(greedy("word " * 110), lambda e: None)


def test_output_never_runs_past_the_context(fp32: LLMEngine) -> None:
    prompt = [7] * 250  # of a 256-token context: room for 6 more
    result = fp32.generate([greedy(prompt, 100, ignore_eos=True)])[0]
    assert (result.completion_tokens, result.finish_reason) == (6, "length")


def test_a_stop_string_split_across_tokens(fp32: LLMEngine) -> None:
    full = fp32.generate([greedy(PROMPTS[3], 30, ignore_eos=True, logprobs=0)])[0]
    assert full.logprobs is not None
    pieces = [fp32.codec.decode([e.token_id]) for e in full.logprobs]
    # The last character of one token and the first of the next, at a boundary where that
    # pair first occurs in the text: the stop string can only be seen across two tokens.
    starts = [len("".join(pieces[:i])) for i in range(1, len(pieces))]
    start = next(
        at
        for at in starts
        if 0 < at < len(full.text) and full.text.index(full.text[at - 1 : at + 1]) == at - 1
    )
    stop = full.text[start - 1 : start + 1]
    cut = fp32.generate([greedy(PROMPTS[3], 30, ignore_eos=True, stop=[stop])])[0]
    assert (cut.text, cut.finish_reason) == (full.text[: full.text.index(stop)], "stop")
    streamed = [e.text for e in fp32.stream(greedy(PROMPTS[3], 30, ignore_eos=True, stop=[stop]))]
    assert "".join(streamed) == cut.text and not any(stop in t for t in streamed)


def test_chinese_streams_whole_characters(export_dir: Path) -> None:
    codec = TextCodec(export_dir)
    text = "用自己的文字训练一个模型，龘靐齉！"  # the rare ones are split over byte-level tokens
    decoder = IncrementalDecoder(codec)
    pieces = [decoder.push(i) for i in codec.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert "" in pieces[:-1]  # some characters did wait for their last byte
    assert not any("\ufffd" in p for p in pieces)


def featured(seed: int, **extra: object) -> GenerationRequest:
    """A sampled request that uses every per-request feature at once."""
    return GenerationRequest(
        prompt=PROMPTS[3],
        max_new_tokens=24,
        temperature=0.9,
        top_p=0.95,
        seed=seed,
        presence_penalty=0.6,
        frequency_penalty=0.4,
        logit_bias={7: 2.5, 11: -3.0},
        logprobs=3,
        **extra,
    )


def assert_same(got: Generation, expected: Generation) -> None:
    """Same tokens; log-probabilities within 1e-6. A prompt whose start is in the prefix
    cache runs only its last tokens, and fp32 sums over fewer rows round differently
    (3e-7 measured on the test model)."""
    assert got.model_dump(exclude={"logprobs"}) == expected.model_dump(exclude={"logprobs"})
    pairs = zip(got.logprobs or [], expected.logprobs or [], strict=True)
    for a, b in pairs:
        assert (a.token_id, [i for i, _ in a.top]) == (b.token_id, [i for i, _ in b.top])
        values = [a.logprob, *(lp for _, lp in a.top)]
        assert values == pytest.approx([b.logprob, *(lp for _, lp in b.top)], abs=1e-6)


def test_every_feature_is_independent_of_batch_mates(engine: LLMEngine) -> None:
    alone = engine.generate([featured(5)])[0]
    mates = [greedy(PROMPTS[0], 30), featured(6), greedy(PROMPTS[2], 5, logprobs=1)]
    in_batch = engine.generate([mates[0], featured(5), *mates[1:]])[1]
    assert_same(in_batch, alone)
    scored = featured(5, prompt_logprobs=3)  # the prompt's scores too (never from the cache)
    assert engine.generate([mates[0], scored, mates[2]])[1] == engine.generate([scored])[0]
    assert alone.logprobs is not None and len(alone.logprobs) == alone.completion_tokens


def test_logprobs_are_the_models_distribution(fp32: LLMEngine) -> None:
    result = fp32.generate([greedy(PROMPTS[0], 12, ignore_eos=True, logprobs=4)])[0]
    assert result.logprobs is not None and len(result.logprobs) == 12
    ids = fp32.codec.encode(result.text)
    for entry in result.logprobs:
        assert len(entry.top) == 4
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.top[0] == (entry.token_id, entry.logprob)  # greedy picks the likeliest
        assert entry.logprob <= 0 and sum(np.exp(lp) for _, lp in entry.top) <= 1 + 1e-6
    assert [e.token_id for e in result.logprobs] == ids


def test_logit_bias_and_openai_penalties(fp32: LLMEngine) -> None:
    plain = fp32.generate([greedy(PROMPTS[1], 30, ignore_eos=True)])[0]
    first = fp32.codec.encode(plain.text)[0]
    forced = fp32.generate([greedy(PROMPTS[1], 5, ignore_eos=True, logit_bias={42: 100})])[0]
    assert fp32.codec.encode(forced.text) == [42] * 5
    banned = fp32.generate([greedy(PROMPTS[1], 5, ignore_eos=True, logit_bias={first: -100})])[0]
    assert fp32.codec.encode(banned.text)[0] != first
    spread = fp32.generate(
        [greedy(PROMPTS[1], 30, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)]
    )[0]
    assert len(set(fp32.codec.encode(spread.text))) > len(set(fp32.codec.encode(plain.text)))


def test_token_id_prompts_and_their_errors(fp32: LLMEngine) -> None:
    ids = fp32.codec.encode(PROMPTS[0])
    by_text = fp32.generate([greedy(PROMPTS[0], 10)])[0]
    assert fp32.generate([greedy(ids, 10)])[0] == by_text
    with pytest.raises(RequestError, match=r"prompt: token ids \[99999\]"):
        fp32.submit(greedy([1, 99999]), lambda e: None)
    with pytest.raises(RequestError, match=r"logit_bias: token ids \[-1\]"):
        fp32.submit(greedy("The", logit_bias={-1: 1.0}), lambda e: None)


def test_n_samples_fork_the_prompts_cache(engine: LLMEngine) -> None:
    def run(request: GenerationRequest, n: int) -> list[Generation]:
        finished: queue.SimpleQueue[tuple[int, Generation]] = queue.SimpleQueue()
        seqs = engine.submit_samples(request, [collector(i, finished.put) for i in range(n)])
        results = dict(finished.get(timeout=60) for _ in seqs)
        return [results[i] for i in range(n)]

    greedy_once = engine.generate([greedy(PROMPTS[3], 20, ignore_eos=True)])[0]
    assert run(greedy(PROMPTS[3], 20, ignore_eos=True), 3) == [greedy_once] * 3
    sampled = featured(9)
    forked = run(sampled, 4)
    assert forked[0] == engine.generate([sampled])[0]  # sample 0 is the lone request
    assert len({g.text for g in forked}) > 1
    engine.scheduler.can_copy = False  # each sample prefilled on its own
    try:
        assert run(sampled, 4) == forked
    finally:
        engine.scheduler.can_copy = True


def test_a_chunked_prefill_gives_the_same_text_while_others_decode(
    export_dir: Path, fp32: LLMEngine
) -> None:
    with LLMEngine(export_dir, "fp32", threads=2, max_running=3, max_prefill_tokens=16) as chunked:
        prompt = " ".join(PROMPTS) * 2  # about 100 tokens: 7 chunks
        assert len(chunked.codec.encode(prompt)) > 64
        expected = fp32.generate([greedy(prompt, 20)])[0]
        events: list[Event] = []
        running = chunked.submit(greedy(PROMPTS[1], 200, ignore_eos=True), events.append)
        while not events:
            threading.Event().wait(0.005)
        assert chunked.generate([greedy(prompt, 20)])[0] == expected
        assert running.finish_reason is None  # it kept decoding all along
        chunked.cancel(running)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_prompts_that_start_as_cached_ones_did_give_the_same_text(
    export_dir: Path, variant: str
) -> None:
    options = {"threads": 2, "max_running": 3}
    with (
        LLMEngine(export_dir, variant, **options, enable_prefix_caching=False) as fresh,
        LLMEngine(export_dir, variant, **options) as cached,
    ):
        system, other = PROMPTS[3], " ".join(PROMPTS[:2]) * 2
        first, running = greedy(system + " first", 8), greedy(other, 40, ignore_eos=True)
        again, joining = greedy(system + " again", 8), greedy(other + " too", 8)
        expected = fresh.generate([first, running, again, joining])

        assert cached.generate([first])[0] == expected[0]  # slot 0 keeps its tokens
        kept = len(cached.scheduler.prefix_cache.kept[0][0])
        keys = cached.runner.cache.view(0)[0, :, :kept].copy()
        finished: queue.SimpleQueue[tuple[int, Generation]] = queue.SimpleQueue()
        decoding = cached.submit(running, collector(1, finished.put))  # slot 1 ...
        while len(decoding.generated) < 2:
            threading.Event().wait(0.005)  # ... decoding, with slot 0 sitting the steps out
        assert np.array_equal(cached.runner.cache.view(0)[0, :, :kept], keys)  # not written
        hits = [cached.submit(r, collector(i, finished.put)) for i, r in ((2, again), (3, joining))]
        results = dict(finished.get(timeout=60) for _ in range(3))
        assert [results[i] for i in (1, 2, 3)] == expected[1:]
        # `again` took slot 0 as it was kept; `joining` copied the running one's prompt.
        assert all(seq.reused >= 16 for seq in hits), [seq.reused for seq in hits]


def test_prompt_logprobs_are_the_models_scores_alone_and_in_chunks(
    run_dir: Path, fp32: LLMEngine
) -> None:
    ids = fp32.codec.encode(PROMPTS[3])
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    with torch.no_grad():
        scores = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    expected = [float(scores[i - 1, ids[i]]) for i in range(1, len(ids))]
    request = greedy(PROMPTS[3], 2, prompt_logprobs=2)
    whole = fp32.generate([request])[0].prompt_logprobs
    assert whole is not None and whole[0].logprob is None  # nothing comes before the first
    assert [e.token_id for e in whole[1:]] == ids[1:] and all(len(e.top) == 2 for e in whole[1:])
    assert [e.logprob for e in whole[1:]] == pytest.approx(expected, abs=1e-4)
    fp32.scheduler.max_prefill_tokens = 8  # the prompt in chunks: each scores what it predicts
    try:
        chunked = fp32.generate([request])[0].prompt_logprobs
    finally:
        fp32.scheduler.max_prefill_tokens = 512
    assert chunked is not None and len(chunked) == len(ids) > 16
    assert [e.logprob for e in chunked[1:]] == pytest.approx(expected, abs=1e-4)


def test_the_kv_cache_is_int8_by_default_and_its_memory_follows_the_settings(
    export_dir: Path,
) -> None:
    config = ModelConfig.read(export_dir)
    per_token = 2 * config.n_layer * config.n_embd  # int8: a byte a number
    with LLMEngine(export_dir, threads=1, max_running=8) as engine:
        assert engine.info.kv_cache_dtype == "int8" and engine.runner.cache.dtype == np.int8
        plan = engine.memory
        assert (plan.bytes_per_token, plan.budget) == (per_token, 8 * config.n_positions)
        assert plan.cache_bytes == plan.budget * per_token and plan.weights_bytes > 0
    with LLMEngine(
        export_dir, threads=1, max_running=8, kv_cache_dtype="fp32", kv_cache_memory_mb=1
    ) as engine:  # 1 MiB holds fewer tokens than 8 whole contexts
        assert engine.runner.cache.dtype == np.float32
        assert engine.memory.budget == 2**20 // (4 * per_token) < 8 * config.n_positions
    with LLMEngine(export_dir, "fp32", threads=1, max_batch_total_tokens=300) as engine:
        assert engine.info.kv_cache_dtype == "fp32" and engine.max_batch_total_tokens == 300


@pytest.mark.parametrize("kv_cache_dtype", ["fp32", "int8"])
def test_a_mixed_step_gives_each_row_what_it_gets_alone(
    export_dir: Path, kv_cache_dtype: str
) -> None:
    """Slot 0 decodes a token and slot 3 prefills a prompt in one call, while slot 1 keeps
    its tokens and sits out (slot 2 holds nothing): each row's logits as in calls of its own,
    and slot 1's cache untouched."""
    ids = TextCodec(export_dir).encode(PROMPTS[3])

    def runner() -> ModelRunner:
        runner = ModelRunner(export_dir, "int8", 4, 1, kv_cache_dtype=kv_cache_dtype)
        runner.run([Chunk(0, ids[:10], 0), Chunk(1, ids[:7], 0)])
        return runner

    mixed, alone = runner(), runner()
    kept = mixed.cache.view(0)[1].copy()
    decoded, prefilled = mixed.run([Chunk(0, ids[10:11], 10), Chunk(3, ids, 0, True)])
    assert np.array_equal(mixed.cache.view(0)[1], kept)
    assert [len(decoded), len(prefilled)] == [1, len(ids)]
    assert np.abs(decoded - alone.run([Chunk(0, ids[10:11], 10)])[0]).max() < 1e-5
    assert np.abs(prefilled - alone.run([Chunk(3, ids, 0, True)])[0]).max() < 1e-5


def test_a_step_of_several_calls_gives_each_row_what_it_gets_alone(export_dir: Path) -> None:
    """A decoding row at the end of the context leaves no room for a prompt chunk's padded
    width beside it: the step takes two calls, and each row still gets its own logits."""
    ids = TextCodec(export_dir).encode(PROMPTS[3])
    context = ModelConfig.read(export_dir).n_positions
    history = (ids * context)[: context - 2]

    def runner() -> ModelRunner:
        runner = ModelRunner(export_dir, "int8", 2, 1)
        runner.run([Chunk(0, history, 0)])
        return runner

    split, alone = runner(), runner()
    rows = [Chunk(0, ids[:1], len(history)), Chunk(1, ids, 0)]
    assert len(plan_calls(rows, context)) == 2
    decoded, prefilled = split.run(rows)
    assert np.abs(decoded - alone.run(rows[:1])[0]).max() < 1e-5
    assert np.abs(prefilled - alone.run(rows[1:])[0]).max() < 1e-5
