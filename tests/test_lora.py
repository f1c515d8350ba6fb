"""LoRA adapters served unmerged over one base: each adapter's output equals its merged
model's, whatever shares the batch, the prefix cache or the stacks with it."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import ADAPTERS, LORA_KEY, MODEL_NAME, cli

from service.engine import AdapterError, GenerationRequest, LLMEngine, RequestError

PROMPTS = ["The meaning of", "Once upon a time, a", "我们今天"]


def greedy(prompt: str, model: str | None = None, tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, model=model, temperature=0, max_new_tokens=tokens, ignore_eos=True
    )


def texts(engine: LLMEngine, requests_: list[GenerationRequest]) -> list[str]:
    return [g.text for g in engine.generate(requests_)]


@pytest.fixture(scope="module")
def lora_engine(export_dir: Path, adapters: dict[str, Path]) -> Iterator[LLMEngine]:
    with LLMEngine(
        export_dir, "fp32", threads=2, max_running=8, name=MODEL_NAME, lora_modules=adapters
    ) as engine:
        yield engine


def merged_texts(adapters: dict[str, Path], variant: str, requests_: list[GenerationRequest]):
    """Each request run on its adapter's merged export (the base for model None)."""
    out = []
    for request in requests_:
        model_dir = adapters[request.model].parent / f"{request.model}-merged-export"
        with LLMEngine(model_dir, variant, threads=2, max_running=1) as engine:
            out += texts(engine, [request.model_copy(update={"model": None})])
    return out


def test_each_adapter_in_a_mixed_batch_equals_its_merged_export_token_for_token(
    lora_engine: LLMEngine, fp32_engine: LLMEngine, adapters: dict[str, Path]
) -> None:
    mixed = [greedy(p, m) for p in PROMPTS for m in (None, *ADAPTERS)]
    served = texts(lora_engine, mixed)
    with_adapter = [(r, t) for r, t in zip(mixed, served, strict=True) if r.model]
    expected = merged_texts(adapters, "fp32", [r for r, _ in with_adapter])
    assert [t for _, t in with_adapter] == expected
    base_rows = [t for r, t in zip(mixed, served, strict=True) if r.model is None]
    assert base_rows == texts(fp32_engine, [greedy(p) for p in PROMPTS])
    # Not a vacuous check: every adapter changes what the model says.
    by_model = {
        m: [t for r, t in zip(mixed, served, strict=True) if r.model == m]
        for m in (None, *ADAPTERS)
    }
    assert len({tuple(t) for t in by_model.values()}) == 4


def test_int8_adapters_stay_within_the_merged_int8_exports_parity(
    run_dir: Path, export_dir: Path, adapters: dict[str, Path]
) -> None:
    """int8 weights and KV cache (the defaults) with the adapter's updates beside them:
    held-out perplexity against PyTorch's merged model moves no more than the merged int8
    export's (its own calibration) does, plus 0.2%, and greedy choices agree as often, less
    1%. The cache's scales are the base's, with headroom for what adapters move (without it
    an adapter of c_attn agreed 0.94 of the time, against 0.99)."""
    import torch
    from transformers import AutoModelForCausalLM

    from service.engine import Chunk, ModelRunner, nll

    blocks = np.array(json.loads((run_dir / "heldout.json").read_text())["input_ids"])[:8, :96]
    rows = [Chunk(i, block[:-1].tolist(), 0, every_position=True) for i, block in enumerate(blocks)]
    for name in ("alice", "bob"):
        merged = AutoModelForCausalLM.from_pretrained(adapters[name] / "merged").eval()
        with torch.no_grad():
            reference = merged(torch.from_numpy(blocks)).logits.numpy()[:, :-1]
        merged_export = adapters[name].parent / f"{name}-merged-export"
        runner = ModelRunner(merged_export, "int8", len(blocks), kv_cache_dtype="int8")
        merged_int8 = np.stack(runner.run(rows))
        with LLMEngine(
            export_dir, "int8", max_running=len(blocks), lora_modules={name: adapters[name]}
        ) as engine:
            assert engine.info.kv_cache_dtype == "int8"
            lora_rows = [Chunk(r.slot, r.token_ids, 0, True, lora_id=1) for r in rows]
            lora_int8 = np.stack(engine.runner.run(lora_rows))
        gap = {
            what: abs(nll(logits, blocks) / nll(reference, blocks) - 1)
            for what, logits in (("merged", merged_int8), ("lora", lora_int8))
        }
        agree = {
            what: (logits.argmax(-1) == reference.argmax(-1)).mean()
            for what, logits in (("merged", merged_int8), ("lora", lora_int8))
        }
        assert gap["lora"] <= gap["merged"] + 0.002, (name, gap)
        assert agree["lora"] >= agree["merged"] - 0.01, (name, agree)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_the_same_prompt_under_two_adapters_gives_each_its_own_text(
    export_dir: Path, adapters: dict[str, Path], variant: str
) -> None:
    """The prefix cache keeps each adapter's keys and values to itself: a long shared prompt
    run under one adapter, then the other, then the first again, gives each what it gives
    alone, and the repeat reuses its own cache."""
    prompt = " ".join(["a shared system prompt that is long enough to be cached"] * 3)
    with LLMEngine(export_dir, variant, threads=2, max_running=3, lora_modules=adapters) as e:
        alone = {m: texts(e, [greedy(prompt, m)])[0] for m in (None, "alice", "bob")}
        e.scheduler.prefix_cache.kept.clear()
        order = ["alice", "bob", "alice", None, "bob"]
        runs = [texts(e, [greedy(prompt, m)])[0] for m in order]
        kept = e.scheduler.prefix_cache.kept
        assert sorted(lora_id for _, _, lora_id in kept.values()) == [0, 1, 2]
    assert alone["alice"] != alone["bob"]
    assert runs == [alone[m] for m in order]


def test_concurrent_requests_over_many_adapters_each_equal_their_solo_run(
    lora_engine: LLMEngine,
) -> None:
    """No adapter's prompt or cache leaks into another's answer under load: requests from
    several threads over the base and three adapters, sampled with seeds, each equal to the
    same request run alone."""
    requests_ = [
        GenerationRequest(prompt=p, model=m, max_new_tokens=12, seed=i, temperature=0.8)
        for i, (p, m) in enumerate((p, m) for p in PROMPTS * 2 for m in (None, *ADAPTERS))
    ]
    solo = [texts(lora_engine, [r])[0] for r in requests_]
    together: dict[int, str] = {}

    def client(indices: range) -> None:
        for i, g in zip(
            indices, lora_engine.generate([requests_[i] for i in indices]), strict=True
        ):
            together[i] = g.text

    threads = [threading.Thread(target=client, args=(range(i, i + 6),)) for i in (0, 6, 12, 18)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [together[i] for i in range(len(requests_))] == solo


def test_past_max_loras_the_least_recently_used_is_evicted_and_read_again(
    export_dir: Path, adapters: dict[str, Path], lora_engine: LLMEngine
) -> None:
    """Stacks of two rows, three adapters: each request still gets its own adapter's text
    (as from stacks that hold all three), read again from its directory after eviction."""
    from service.engine import metrics

    requests_ = [greedy(p, m) for p in PROMPTS for m in (*ADAPTERS, *reversed(ADAPTERS))]
    with LLMEngine(
        export_dir, "fp32", threads=2, max_running=4, max_loras=2, lora_modules=adapters
    ) as engine:
        evictions = metrics.LORA_EVICTIONS.labels(model=engine.info.name)
        before = evictions._value.get()
        assert len(engine.runner.adapters.resident) == 2  # carol's load evicted alice's
        one_by_one = [texts(engine, [r])[0] for r in requests_]
        all_at_once = texts(engine, requests_)  # three adapters, two rows: some wait
        assert evictions._value.get() > before
    assert one_by_one == all_at_once == texts(lora_engine, requests_)


def test_an_adapter_that_cannot_be_served_is_refused_with_one_line(
    lora_engine: LLMEngine, adapters: dict[str, Path], tmp_path: Path
) -> None:
    names = lora_engine.lora_adapters()
    cases = {}
    wrong_base = tmp_path / "wrong-base"
    shutil.copytree(adapters["alice"], wrong_base, ignore=shutil.ignore_patterns("merged"))
    (wrong_base / "manifest.json").write_text(
        json.dumps({"kind": "adapter", "base_fingerprint": "0" * 16, "base_model": "gpt2"})
    )
    cases[wrong_base] = "trained on another base"
    dora = tmp_path / "dora"
    shutil.copytree(adapters["alice"], dora, ignore=shutil.ignore_patterns("merged"))
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    cases[dora] = "DoRA is not supported"
    broken = tmp_path / "broken"
    shutil.copytree(adapters["alice"], broken, ignore=shutil.ignore_patterns("merged"))
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    cases[broken] = "not a safetensors file"
    bad_manifest = tmp_path / "bad-manifest"
    shutil.copytree(adapters["alice"], bad_manifest, ignore=shutil.ignore_patterns("merged"))
    (bad_manifest / "manifest.json").write_text("{not json")
    cases[bad_manifest] = "cannot read the adapter"
    alpha = tmp_path / "alpha"
    shutil.copytree(adapters["alice"], alpha, ignore=shutil.ignore_patterns("merged"))
    (alpha / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": "16"}))
    cases[alpha] = "lora_alpha is '16', not a number"
    cases[tmp_path / "missing"] = "no such directory"
    cases[tmp_path] = "not a LoRA adapter"
    for path, message in cases.items():
        with pytest.raises(AdapterError, match=message) as caught:
            lora_engine.load_lora_adapter("new", path)
        assert "\n" not in str(caught.value)
    with pytest.raises(AdapterError, match="over this server's max_lora_rank 2"):
        LLMEngine(
            lora_engine.runner.path.parent,
            "fp32",
            max_lora_rank=2,
            lora_modules={"bob": adapters["bob"]},
        )
    with pytest.raises(AdapterError, match="loaded: unload it first"):
        lora_engine.load_lora_adapter("alice", adapters["bob"])
    assert lora_engine.lora_adapters() == names
    with pytest.raises(RequestError, match="'nobody' is not served here"):
        lora_engine.generate([greedy("Hi", "nobody")])


def test_a_server_loads_lists_serves_and_unloads_adapters_at_run_time(
    lora_server: str, adapters: dict[str, Path]
) -> None:
    """`bentoml serve` with one adapter from the start and the adapters directory open to
    vLLM's load and unload routes, behind an API key: a path out of the directory, a link
    out of it or a malformed adapter is a 400 that changes nothing."""
    url, key = lora_server, {"Authorization": f"Bearer {LORA_KEY}"}

    def post(route: str, body: dict, headers: dict = key) -> requests.Response:
        return requests.post(f"{url}/v1/{route}", json=body, headers=headers, timeout=60)

    def models() -> dict[str, str | None]:
        listed = requests.get(f"{url}/v1/models", headers=key, timeout=10).json()["data"]
        return {m["id"]: m["parent"] for m in listed}

    def complete(model: str) -> int:
        body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        return post("completions", body).status_code

    base = next(iter(models()))
    assert models() == {base: None, "alice": base}
    assert complete("alice") == 200
    bob = {"lora_name": "bob", "lora_path": "bob"}
    assert post("load_lora_adapter", bob, headers={}).status_code == 401
    outside = str(adapters["alice"].parent.parent / "outside")
    for path in (outside, "../outside", "link-out", "files-out", "loop", "a\x00b", "junk", "none"):
        refused = post("load_lora_adapter", bob | {"lora_path": path})
        assert refused.status_code == 400, (path, refused.text)
        assert "\n" not in refused.json()["error"]["message"]
    assert models() == {base: None, "alice": base}
    assert post("load_lora_adapter", bob).status_code == 200
    assert models() == {base: None, "alice": base, "bob": base}
    assert complete("bob") == 200
    assert post("unload_lora_adapter", {"lora_name": "bob"}).status_code == 200
    assert complete("bob") == 404
    assert post("unload_lora_adapter", {"lora_name": "bob"}).status_code == 404
    text = requests.get(f"{url}/metrics", headers=key, timeout=10).text
    assert f'tailorgpt_lora_requests_total{{adapter="alice",model="{base}"}} 1.0' in text
    assert f'tailorgpt_lora_adapters{{model="{base}",state="loaded"}} 1.0' in text


def test_generate_with_lora_runs_the_adapter_over_the_model(
    export_dir: Path,
    adapters: dict[str, Path],
    lora_engine: LLMEngine,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--variant", "fp32", "--temperature", "0", "--max_new_tokens", "12"]
    bob = str(adapters["bob"])
    ran = cli(capsys, "generate", str(export_dir), "Once upon", "--lora", bob, *args)
    request = GenerationRequest(prompt="Once upon", model="bob", temperature=0, max_new_tokens=12)
    expected = texts(lora_engine, [request])[0]
    assert ran.returncode == 0 and expected.strip() and expected.strip() in ran.stdout
    refused = cli(capsys, "generate", str(export_dir), "Hi", "--lora", str(export_dir), *args)
    assert refused.returncode != 0 and "not a LoRA adapter" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_adapter_waiting_for_a_row_of_the_stacks_holds_no_one_else_up() -> None:
    """max_loras adapters running: a request of another adapter keeps its place in the
    queue, and one of the base (or of a running adapter) behind it starts."""
    from service.engine.scheduler import Scheduler, Sequence

    scheduler = Scheduler(4, 0, 10_000, 16, 512, max_loras=1)

    def seq(lora_id: int) -> Sequence:
        made = Sequence(GenerationRequest(prompt="x"), [1, 2, 3], 4)
        made.lora_id = lora_id
        return made

    first, other, base, same = seq(1), seq(2), seq(0), seq(1)
    scheduler.add([first])
    scheduler.schedule()
    scheduler.add([other])
    scheduler.add([base])
    scheduler.add([same])
    scheduler.schedule()
    assert [s for s in scheduler.running()] == [first, base, same]
    assert list(scheduler.waiting) == [other]
    scheduler.finish(first, "stop")
    scheduler.finish(same, "stop")
    scheduler.schedule()
    assert other in scheduler.running() and not scheduler.waiting


def test_an_adapter_whose_files_change_after_an_eviction_ends_only_its_own_requests(
    export_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Read again after an eviction, an adapter's files must be those checked at load: a
    changed (or removed) one ends its own requests with "error" and is unloaded; the base's
    and the other adapters' requests in the same steps finish."""
    copy = tmp_path / "dave"
    shutil.copytree(adapters["bob"], copy, ignore=shutil.ignore_patterns("merged"))
    modules = {"dave": copy, "alice": adapters["alice"], "bob": adapters["bob"]}
    with LLMEngine(
        export_dir, "fp32", threads=2, max_running=4, max_loras=2, lora_modules=modules
    ) as engine:
        assert 1 not in engine.runner.adapters.resident  # dave's row went to bob
        shutil.copy(adapters["carol"] / "adapter_model.safetensors", copy)
        answers = engine.generate([greedy("Hi", m) for m in ("dave", None, "alice")])
        assert [a.finish_reason for a in answers] == ["error", "length", "length"]
        assert engine.lora_adapters() == ["alice", "bob"]


def test_bf16_adapters_load_as_their_float32_values(
    adapters: dict[str, Path], export_dir: Path, tmp_path: Path
) -> None:
    """peft saves bf16 adapters of bf16 training; numpy has no bf16, the reader widens it."""
    import torch
    from safetensors.torch import load_file, save_file

    from service.engine.lora import Base, read_adapter

    bf16 = tmp_path / "bf16"
    shutil.copytree(adapters["bob"], bf16, ignore=shutil.ignore_patterns("merged"))
    weights = load_file(bf16 / "adapter_model.safetensors")
    save_file(
        {k: v.to(torch.bfloat16) for k, v in weights.items()}, bf16 / "adapter_model.safetensors"
    )
    base = Base.of(export_dir)
    widened, _ = read_adapter(bf16, base, 16)
    exact, _ = read_adapter(adapters["bob"], base, 16)
    assert widened.keys() == exact.keys()
    for name, tensor in exact.items():
        np.testing.assert_allclose(widened[name], tensor, rtol=2**-7, atol=1e-6)
