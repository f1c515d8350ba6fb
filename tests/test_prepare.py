"""`tailorgpt prepare` on messy files: encodings, HTML, chat logs, dedup, PII, bad lines."""

from __future__ import annotations

import json
import math
import random
import re
import string
from pathlib import Path

import pytest
from helpers import CORPUS, ZH, kept_texts, run_cli, train_args

from artifacts import UserError
from training.prepare import NUM_PERM, SHINGLE, Deduplicator, PrepareArgs, clean, prepare


def run_prepare(inputs: Path, output: Path, **options: object) -> dict:
    return prepare(PrepareArgs(inputs=[inputs], output_dir=output, **options))


def test_encodings_are_detected_and_chinese_punctuation_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "gbk.txt").write_bytes(ZH.encode("gbk"))
    (data / "utf16.txt").write_bytes(("UTF-16 notes: " + ZH[:20]).encode("utf-16"))
    (data / "bom.md").write_bytes("\ufeff# Title\n\nA note saved with a byte order mark.".encode())
    (data / "mojibake.txt").write_text("The cafÃ© served crÃ¨me brÃ»lÃ©e all day long.")
    report = run_prepare(data, tmp_path / "out", validation_split_percentage=0)
    texts = kept_texts(tmp_path / "out")
    assert ZH in texts  # full-width ，“”！ untouched
    assert "UTF-16 notes: " + ZH[:20] in texts
    assert "# Title\n\nA note saved with a byte order mark." in texts
    assert "The café served crème brûlée all day long." in texts
    assert report["kept"]["documents"] == 4 and report["scripts"]["zh"] == 1


def test_valid_utf8_is_read_as_utf8_and_other_encodings_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    # Valid UTF-8 holding mojibake: a detector alone reads it as Korean (cp949).
    (data / "cafe.txt").write_text("Met Ana at the cafÃ©. We shared a crÃ¨me brÃ»lÃ©e.\n")
    (data / "gbk.txt").write_bytes(ZH.encode("gbk"))
    report = run_prepare(data, tmp_path / "out", validation_split_percentage=0)
    assert "Met Ana at the café. We shared a crème brûlée." in kept_texts(tmp_path / "out")
    [gbk] = report["encodings"]  # the UTF-8 file is not listed
    assert gbk["file"] == str(data / "gbk.txt") and gbk["encoding"] == "gb18030"
    assert 0.5 < gbk["confidence"] <= 1
    assert f"{data / 'gbk.txt'}: read as gb18030" in capsys.readouterr().err


@pytest.mark.parametrize("byte_order", ["le", "be"])
def test_utf16_without_byte_order_mark_is_read(tmp_path: Path, byte_order: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    notes = {
        "en.txt": "Notes saved by an old editor.\nSecond line, still plain.",
        "zh.txt": ZH + "\n" + ZH[::-1],
        "mixed.md": "# 周记\n\n" + ZH + " Tuesday 3 pm.",
    }
    for name, text in notes.items():
        (data / name).write_bytes(text.encode(f"utf-16-{byte_order}"))
    report = run_prepare(data, tmp_path / "out", validation_split_percentage=0)
    assert sorted(kept_texts(tmp_path / "out")) == sorted(notes.values())
    assert {e["encoding"] for e in report["encodings"]} == {f"utf-16-{byte_order}"}


def test_a_large_file_whose_sample_ends_inside_a_character(tmp_path: Path) -> None:
    line = json.dumps({"text": ZH}, ensure_ascii=False) + "\n"
    big = tmp_path / "big.jsonl"
    with big.open("w", encoding="utf-8") as f:
        for number in range(1 + (2 << 20) // len(line.encode())):
            f.write(json.dumps({"text": f"{number} {ZH}"}, ensure_ascii=False) + "\n")
    data = big.read_bytes()
    assert data[(1 << 20) - 1] >= 0x80  # the first MiB ends inside a Chinese character
    # The lines differ only in their number: near duplicates, which are not the point here.
    report = run_prepare(big, tmp_path / "out", near_duplicate_threshold=1.0)
    assert report["dropped"]["encoding"]["documents"] == 0
    assert report["kept"]["documents"] > 1000


def test_binary_and_broken_inputs_are_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "image.txt").write_bytes(bytes(range(256)) * 20)
    (data / "log.jsonl").write_text(
        '{"text": "the first line is fine and long enough"}\n{oops\n'
        '{"other": 1}\n{"text": "the fourth line is fine as well"}\n'
    )
    (data / "table.csv").write_text("id,body\n1,some text that is long enough\n")
    report = run_prepare(data, tmp_path / "out", validation_split_percentage=0)
    err = capsys.readouterr().err
    assert f"{data / 'image.txt'}: binary" in err
    assert f"{data / 'log.jsonl'}:2:" in err and f"{data / 'log.jsonl'}:3:" in err
    assert f"{data / 'table.csv'}: no 'text' column" in err
    assert kept_texts(tmp_path / "out") == [
        "the first line is fine and long enough",
        "the fourth line is fine as well",
    ]
    assert report["dropped"]["encoding"]["documents"] == 1
    assert report["dropped"]["bad_line"]["documents"] == 3


def test_html_chat_and_json_array_become_plain_text(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "page.html").write_text(
        "<html><head><script>var x = 1;</script><style>p {}</style></head>"
        "<body><h1>Notes</h1><p>Plain   words&nbsp;in a page.</p></body></html>"
    )
    (data / "chats.json").write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "user", "content": "How do I start?"},
                        {"role": "assistant", "content": "Train the tiny preset first."},
                    ]
                }
            ]
        )
    )
    run_prepare(data, tmp_path / "out", validation_split_percentage=0)
    texts = kept_texts(tmp_path / "out")
    assert "user: How do I start?\n\nassistant: Train the tiny preset first." in texts
    assert "Notes\nPlain words in a page." in texts
    assert not any("var x" in t for t in texts)


def test_exact_and_near_duplicates_are_dropped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    long_zh = (CORPUS / "essay-zh.txt").read_text(encoding="utf-8")  # about 500 characters
    (data / "a.txt").write_text(long_zh)
    (data / "b.txt").write_text(long_zh)  # exact copy
    (data / "c.txt").write_text(long_zh.replace("小模型", "小模形", 1))  # one character differs
    (data / "d.txt").write_text("An entirely different note about serving with BentoML.")
    report = run_prepare(data, tmp_path / "out", validation_split_percentage=0)
    assert report["dropped"]["duplicate"]["documents"] == 1
    assert report["dropped"]["near_duplicate"]["documents"] == 1
    assert len(kept_texts(tmp_path / "out")) == 2
    no_near = run_prepare(data, tmp_path / "out2", near_duplicate_threshold=1.0)
    assert no_near["dropped"]["near_duplicate"]["documents"] == 0


NOTE = (  # 472 characters
    "Late March. Walked the long loop around the reservoir with Mei before breakfast; "
    "the path was still muddy from Friday's rain and the herons were back on the north bank. "
    "We talked about the training run that keeps stalling at step four thousand, and she thinks "
    "the learning rate warmup is too short for such a small batch. Back home I made coffee, "
    "wrote down the three things to try tomorrow, and read two chapters of the novel Jun lent "
    "me last month before the light went."
)


def shingles(text: str) -> set[str]:
    squeezed = re.sub(r"\s+", "", text)
    return {squeezed[i : i + SHINGLE] for i in range(len(squeezed) - SHINGLE + 1)}


def jaccard(a: str, b: str) -> float:
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


def test_a_note_edited_in_two_words_is_a_near_duplicate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    edited = NOTE.replace("north", "south").replace("two chapters", "three chapters")
    assert 0.92 < jaccard(NOTE, edited) < 0.94
    (data / "a.txt").write_text(NOTE)
    (data / "b.txt").write_text(edited)
    report = run_prepare(data, tmp_path / "out", validation_split_percentage=0)
    assert report["dropped"]["near_duplicate"]["documents"] == 1


def edited_pair(rng: random.Random, edits: int) -> tuple[str, str]:
    """A random 500-letter text and a copy with `edits` letters changed."""
    text = rng.choices(string.ascii_lowercase, k=500)
    copy = list(text)
    for i in rng.sample(range(len(text)), edits):
        copy[i] = rng.choice(string.ascii_lowercase.replace(text[i], ""))
    return "".join(text), "".join(copy)


def promised(s: float, dedup: Deduplicator, threshold: float) -> float:
    """A lower bound on the chance that a pair of Jaccard s is caught.

    Each permutation's minimum agrees with chance s, independently: the pair must share one
    of the index's b bands of r rows, then agree in at least threshold * NUM_PERM places.
    Both events grow with the agreements, so their product is a lower bound (Harris).
    """
    b, r = dedup.lsh.b, dedup.lsh.r
    shares_a_band = 1 - (1 - s**r) ** b
    need = math.ceil(threshold * NUM_PERM)
    agree = sum(
        math.comb(NUM_PERM, k) * s**k * (1 - s) ** (NUM_PERM - k) for k in range(need, NUM_PERM + 1)
    )
    return shares_a_band * agree


def caught(dedup: Deduplicator, pairs: list[tuple[str, str]]) -> list[bool]:
    """For each pair, whether the second text is flagged once the first is indexed."""
    flags = []
    for a, b in pairs:
        assert dedup.check(a, key=a) is None  # random texts: unlike any other pair's
        flags.append(dedup.check(b, key=b) == "near_duplicate")
    return flags


def test_near_duplicates_are_caught_at_the_rate_the_index_promises() -> None:
    threshold = PrepareArgs.near_duplicate_threshold
    dedup = Deduplicator(threshold)
    assert promised(threshold + 0.05, dedup, threshold) > 0.95  # the threshold means what it says
    rng = random.Random(11)
    close = [edited_pair(rng, rng.randint(1, 5)) for _ in range(200)]
    chances = [promised(jaccard(a, b), dedup, threshold) for a, b in close]
    assert min(jaccard(a, b) for a, b in close) > threshold + 0.04
    expected = sum(chances)
    spread = math.sqrt(sum(p * (1 - p) for p in chances))
    assert sum(caught(dedup, close)) >= expected - 3 * spread - 1
    far = [edited_pair(rng, rng.randint(25, 35)) for _ in range(200)]
    assert max(jaccard(a, b) for a, b in far) < threshold - 0.15
    assert sum(caught(dedup, far)) <= 5


def test_length_range_is_counted_in_characters(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "short.txt").write_text("短短的一句话")  # 6 characters, 18 bytes
    (data / "ok.txt").write_text("这一句话有十几个汉字，应该被保留下来。")
    (data / "long.txt").write_text("长" * 101)
    report = run_prepare(data, tmp_path / "out", min_chars=10, max_chars=100)
    assert report["dropped"]["too_short"]["documents"] == 1
    assert report["dropped"]["too_long"]["documents"] == 1
    assert report["kept"]["documents"] == 1


def test_pii_is_scrubbed_when_asked(tmp_path: Path) -> None:
    source = tmp_path / "contacts.txt"
    source.write_text(
        "Write to li.lei@example.com, call 138-1234-5678 or +86 13912345678, "
        "ID 11010519491231002X, server 10.0.0.12, office (415) 555-0132."
    )
    run_prepare(source, tmp_path / "out", validation_split_percentage=0, scrub_pii=True)
    assert kept_texts(tmp_path / "out") == [
        "Write to <EMAIL>, call <PHONE> or <PHONE>, ID <ID_NUMBER>, server <IP>, office <PHONE>."
    ]
    run_prepare(source, tmp_path / "plain", validation_split_percentage=0)
    assert "li.lei@example.com" in kept_texts(tmp_path / "plain")[0]


PII = [
    ("<EMAIL>", "a.b@example.com"),
    ("<ID_NUMBER>", "11010519491231002X"),
    ("<IP>", "192.168.1.20"),
    ("<PHONE>", "13812345678"),
    ("<PHONE>", "+86 138-1234-5678"),
    ("<PHONE>", "(415) 555-0132"),
    ("<PHONE>", "(415)555-0132"),
    ("<PHONE>", "+1 415-555-0132"),
]
CONTEXTS = [
    pytest.param("Reach me at {}.", id="sentence-end"),
    pytest.param("Reach me at {}, thanks.", id="comma"),
    pytest.param("Contact ({}) today.", id="parentheses"),
    pytest.param("Contact [{}] today.", id="brackets"),
    pytest.param("我的联系方式是{}，谢谢。", id="zh-no-spaces"),
    pytest.param("联系方式：{}。", id="zh-colon-period"),
    pytest.param("联系方式（{}）；", id="zh-brackets-semicolon"),
    pytest.param("联系方式{}就在这里", id="zh-letters-both-sides"),
]


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize(("placeholder", "value"), PII, ids=[v for _, v in PII])
def test_every_pii_pattern_in_every_context(placeholder: str, value: str, context: str) -> None:
    scrubbed = clean(context.format(value), is_html=False, scrub_pii=True)
    assert scrubbed == context.format(placeholder)


def test_pii_in_chinese_and_look_alikes_that_are_not_pii() -> None:
    text = "我的邮箱是a.b@example.com，电话13812345678。server 192.168.1.20."
    assert clean(text, False, True) == "我的邮箱是<EMAIL>，电话<PHONE>。server <IP>."
    kept = "version 1.2.3.4.5, order 123456789012, 3.14159 and 2024-05-01."
    assert clean(kept, False, True) == kept


def test_nothing_to_prepare_leaves_no_output(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no .* files found"):
        run_prepare(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("hi")
    with pytest.raises(UserError, match="no document kept from 1 file"):
        run_prepare(tmp_path / "tiny", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.model  # trains
def test_prepared_dataset_trains_with_its_own_split(tmp_path: Path) -> None:
    data = tmp_path / "dataset"
    result = run_cli(
        "prepare", str(CORPUS), "--output", str(data), "--validation_split_percentage", "25"
    )
    assert "dropped: near_duplicate" in result.stdout
    report = json.loads((data / "report.json").read_text())
    assert report["kept"]["documents"] > 20 and report["scripts"]["zh"] >= 3
    run_cli(*train_args(tmp_path / "run", "--block_size", "32", "--max_steps", "4", data=data))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["documents"] == report["kept"]["documents"]
    assert metrics["optimizer_steps"] == 4


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("near_duplicate_threshold", -0.5),
        ("near_duplicate_threshold", 1.5),
        ("validation_split_percentage", 100.0),
    ],
)
def test_out_of_range_options_are_named(tmp_path: Path, option: str, value: float) -> None:
    with pytest.raises(UserError, match=f"--{option.replace('_', '-')}|--{option}"):
        run_prepare(CORPUS, tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()
