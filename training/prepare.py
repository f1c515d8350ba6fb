"""`tailorgpt prepare`: turn messy personal files into a clean train/validation dataset.

Streams files one at a time (JSONL and CSV line by line), so memory stays bounded by the
dedup index, not by the corpus. Every document dropped is counted under its reason.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import xxhash
from bs4 import BeautifulSoup
from charset_normalizer import from_bytes
from datasketch import MinHash, MinHashLSH
from tqdm import tqdm

from artifacts import MANIFEST, UserError, atomic_dir, write_json, write_manifest
from training.arguments import PrepareArgs, ReadArgs

SUFFIXES = (".txt", ".md", ".html", ".htm", ".jsonl", ".json", ".csv")
TRAIN, VALIDATION, REPORT = "train.jsonl", "validation.jsonl", "report.json"
DROP_REASONS = ("encoding", "bad_line", "too_short", "too_long", "duplicate", "near_duplicate")
ENCODING_SAMPLE = 1 << 20  # bytes read to detect a file's encoding
NUM_PERM = 128  # the estimate's spread at Jaccard 0.9 is 0.027: enough to apply a threshold
TOKEN_SAMPLE = 200  # documents
SHINGLE_CHUNK = 16_384  # shingles hashed at once, to bound memory on long documents
SHINGLE = 5  # character n-grams: works for unsegmented Chinese as well as English

# Keep the author's characters: no full-width folding (NFKC would turn "，" into ","),
# no straightening of curly quotes; only repair mojibake and broken escapes.
FTFY_CONFIG = ftfy.TextFixerConfig(fix_character_width=False, uncurl_quotes=False)

# PII is often written inside Chinese text, with no space around it: \w would match the Han
# characters next to it, so these patterns spell out the letters they accept. A sentence's
# final period is not part of an address.
PII_PATTERNS = [  # most specific first: an ID number contains phone-like digit runs
    (
        "<EMAIL>",
        re.compile(
            r"[A-Za-z0-9\u00c0-\u024f._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
        ),
    ),
    (
        "<ID_NUMBER>",
        re.compile(r"(?<!\d)\d{6}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])\d{2}\d{3}[\dXx](?!\d)"),
    ),
    (  # not inside a longer dotted number such as a version 1.2.3.4.5
        "<IP>",
        re.compile(
            r"(?<!\d)(?<!\d\.)(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)"
            r"(?!\.?\d)"
        ),
    ),
    ("<PHONE>", re.compile(r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d[- ]?\d{4}[- ]?\d{4}(?!\d)")),
    (
        "<PHONE>",
        re.compile(
            r"(?<![A-Za-z\d+])(?:\+?\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])"
            r"\d{3}[ .-]\d{4}(?!\d)"
        ),
    ),
]


@dataclass
class Report:
    files: int = 0
    read: Counter = field(default_factory=Counter)  # documents, characters
    kept: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(
        default_factory=lambda: {r: Counter() for r in DROP_REASONS}
    )
    scripts: Counter = field(default_factory=Counter)
    encodings: list[dict[str, Any]] = field(default_factory=list)  # files read as other than UTF-8
    warnings: list[str] = field(default_factory=list)
    sample: list[str] = field(default_factory=list)  # kept texts for tokens per character

    def drop(self, reason: str, text: str = "") -> None:
        self.dropped[reason]["documents"] += 1
        self.dropped[reason]["characters"] += len(text)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"tailorgpt: warning: {message}", file=sys.stderr)

    def encoding(self, path: Path, encoding: Encoding) -> None:
        """Names a file not read as UTF-8, so that a wrong guess can be checked."""
        self.encodings.append(
            {"file": str(path), "encoding": encoding.name, "confidence": encoding.confidence}
        )
        print(
            f"tailorgpt: {path}: read as {encoding.name} (confidence {encoding.confidence:.2f})",
            file=sys.stderr,
        )


def find_files(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in inputs:
        if not path.exists():
            raise UserError(f"{path}: no such file or folder: pass files or folders of text")
        if path.is_file():
            files.append(path)
        else:
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES))
    files = [f for f in files if f.is_file()]
    if not files:
        raise UserError(
            f"{', '.join(map(str, inputs))}: no {'/'.join(SUFFIXES)} files found: add some text"
        )
    return files


@dataclass(frozen=True)
class Encoding:
    name: str
    confidence: float  # 1.0 where the bytes allow no other reading: a byte-order mark, valid UTF-8

    @property
    def is_utf8(self) -> bool:
        return self.name == "utf-8-sig"


def detect_encoding(path: Path) -> Encoding | None:
    """The file's text encoding, or None for binary or undecodable content."""
    with path.open("rb") as f:
        sample = f.read(ENCODING_SAMPLE)
    whole = len(sample) < ENCODING_SAMPLE  # else a character may be cut at the sample's edge
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        return Encoding("utf-16", 1.0)
    if b"\x00" in sample:  # NUL bytes mean binary, unless the text is UTF-16
        return utf16_without_bom(sample, whole)
    if decode(sample, "utf-8", whole) is not None:
        # Checked before any guess: a detector may read valid UTF-8 (mojibake included) as,
        # say, Korean; "-sig" drops a byte-order mark.
        return Encoding("utf-8-sig", 1.0)
    if not whole and b"\n" in sample:
        # Cut at a line end: in the legacy CJK encodings a newline byte is never inside a character.
        sample = sample[: sample.rindex(b"\n") + 1]
    match = from_bytes(sample).best()
    return None if match is None else Encoding(match.encoding, round(1 - match.chaos, 2))


def utf16_without_bom(sample: bytes, whole: bool) -> Encoding | None:
    """UTF-16 without a byte-order mark, or None when neither byte order reads as text.

    Newlines, spaces, digits and Latin letters have a NUL high byte, on odd positions in
    little-endian: try that order first. The wrong order reads as control or private-use
    characters, or as unpaired surrogates, which do not decode.
    """
    odd, even = sample[1::2].count(0), sample[0::2].count(0)
    orders = ["utf-16-le", "utf-16-be"] if odd >= even else ["utf-16-be", "utf-16-le"]
    readable = [name for name in orders if is_text(decode(sample, name, whole))]
    if not readable:
        return None
    return Encoding(readable[0], 1.0 if len(readable) == 1 else 0.5)


def is_text(text: str | None) -> bool:
    return text is not None and not re.search(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ue000-\uf8ff]", text)


def decode(sample: bytes, encoding: str, whole: bool) -> str | None:
    """The sample as text, or None where invalid; a character cut at its end is fine."""
    try:
        return codecs.getincrementaldecoder(encoding)().decode(sample, final=whole)
    except UnicodeDecodeError:
        return None


def chat_to_text(messages: list[dict[str, Any]]) -> str:
    """A chat record as plain text: one `role: content` paragraph per message."""
    return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def read_records(path: Path, encoding: Encoding, args: ReadArgs, report: Report) -> Iterator[str]:
    """The raw documents of one file; bad lines are reported with file and line, then skipped."""
    suffix = path.suffix.lower()
    with path.open(encoding=encoding.name, errors="strict", newline="") as f:
        if suffix == ".csv":
            reader = csv.DictReader(f)
            if args.text_column not in (reader.fieldnames or []):
                report.warn(
                    f"{path}: no '{args.text_column}' column (columns: "
                    f"{reader.fieldnames}); skipped the file: use --text_column"
                )
                report.drop("bad_line")
                return
            for row in reader:
                yield row[args.text_column] or ""
        elif suffix == ".json":
            yield from json_file_records(path, f.read(), args, report)
        elif suffix == ".jsonl":
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield record_text(json.loads(line), args.text_field)
                except (json.JSONDecodeError, ValueError) as err:
                    report.warn(f"{path}:{number}: {err}; skipped the line")
                    report.drop("bad_line", line)
        else:
            yield f.read()


def json_file_records(path: Path, content: str, args: ReadArgs, report: Report) -> Iterator[str]:
    """A .json file: one record, or a list of them (chat exports often come this way)."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as err:
        report.warn(f"{path}:{err.lineno}: {err.msg}; skipped the file")
        report.drop("bad_line", content)
        return
    for number, record in enumerate(data if isinstance(data, list) else [data], start=1):
        try:
            yield record_text(record, args.text_field)
        except ValueError as err:
            report.warn(f"{path}: record {number}: {err}; skipped the record")
            report.drop("bad_line")


def record_text(record: Any, text_field: str) -> str:
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return record[text_field]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return chat_to_text(record["messages"])
    raise ValueError(f"no string field '{text_field}' and no 'messages' list (see --text_field)")


def clean(text: str, is_html: bool, scrub_pii: bool) -> str:
    if is_html or text.lstrip().startswith(("<!DOCTYPE", "<html")):
        soup = BeautifulSoup(text, "html.parser")
        for tag in soup(["script", "style", "noscript"]):
            tag.decompose()
        text = soup.get_text("\n")
    text = ftfy.fix_text(text, FTFY_CONFIG)
    if scrub_pii:
        for placeholder, pattern in PII_PATTERNS:
            text = pattern.sub(placeholder, text)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def script_of(text: str) -> str:
    """zh, latin or mixed, from the share of CJK characters among letters."""
    cjk = len(re.findall(r"[\u3400-\u9fff\uf900-\ufaff]", text))
    letters = cjk + len(re.findall(r"[A-Za-z\u00c0-\u024f]", text))
    if not letters:
        return "other"
    share = cjk / letters
    return "zh" if share > 0.8 else "latin" if share < 0.2 else "mixed"


class Deduplicator:
    """Exact duplicates by hash, near duplicates by MinHash LSH over character n-grams.

    The LSH index only proposes candidates. Its banding cannot draw a sharp line at the
    threshold (with the default weights, 64 permutations gave 4 bands of 15 rows: a pair at
    Jaccard 0.93 was caught 81% of the time, one at 0.85 31%). So it is tuned for recall,
    and a candidate counts when the estimated Jaccard of the pair reaches the threshold.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.seen: set[bytes] = set()
        self.signatures: dict[str, np.ndarray] = {}  # 512 bytes per kept document
        self.lsh = (
            MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=(0.1, 0.9))
            if threshold < 1
            else None
        )
        # Drawing the permutations is a tenth of the work per document: draw them once.
        template = MinHash(num_perm=NUM_PERM, seed=1)
        self.permutations, self.scheme = template.permutations, template.scheme

    def check(self, text: str, key: str) -> str | None:
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in self.seen:
            return "duplicate"
        self.seen.add(digest)
        if self.lsh is None:
            return None
        minhash = self.minhash(text)
        if self.similar(minhash, self.lsh.query(minhash)):
            return "near_duplicate"
        self.lsh.insert(key, minhash)
        self.signatures[key] = minhash.hashvalues
        return None

    def similar(self, minhash: MinHash, candidates: list[str]) -> bool:
        """Whether any candidate's estimated Jaccard reaches the threshold."""
        need = self.threshold * NUM_PERM
        return any(
            np.count_nonzero(minhash.hashvalues == self.signatures[key]) >= need
            for key in candidates
        )

    def minhash(self, text: str) -> MinHash:
        squeezed = re.sub(r"\s+", "", text)
        # xxhash instead of datasketch's default SHA-1: the same spread, several times faster.
        minhash = MinHash(
            num_perm=NUM_PERM,
            hashfunc=xxhash.xxh32_intdigest,
            permutations=self.permutations,
            scheme=self.scheme,
        )
        # In chunks: one batch holds num_perm hashes per shingle, 2 GB for a 4 MB document.
        count = max(1, len(squeezed) - SHINGLE + 1)
        for start in range(0, count, SHINGLE_CHUNK):
            shingles = range(start, min(start + SHINGLE_CHUNK, count))
            minhash.update_batch([squeezed[i : i + SHINGLE].encode() for i in shingles])
        return minhash


def tokens_per_character(tokenizer_name: str | None, sample: list[str]) -> float | None:
    if not tokenizer_name or not sample:
        return None
    from training.model import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    return tokens / sum(len(s) for s in sample)


class SplitWriter:
    """Writes each kept document to train or validation, drawn with the seeded generator."""

    def __init__(self, work: Path, validation_percentage: float, seed: int) -> None:
        self.train = (work / TRAIN).open("w", encoding="utf-8")
        self.validation = (work / VALIDATION).open("w", encoding="utf-8")
        self.share = validation_percentage / 100
        self.rng = np.random.default_rng(seed)

    def write(self, text: str) -> None:
        split = self.validation if self.rng.random() < self.share else self.train
        split.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def read_documents(inputs: list[Path], args: ReadArgs | None = None) -> list[str]:
    """The documents `prepare` keeps from these files and folders, cleaned and deduplicated:
    what `train` reads from a folder that is not a `prepare` output."""
    report = Report()
    args = args or ReadArgs()
    documents = list(kept_documents(inputs, args, report))
    check_kept(report, inputs, args)
    return documents


def kept_documents(inputs: list[Path], args: ReadArgs, report: Report) -> Iterator[str]:
    files = find_files(inputs)
    report.files = len(files)
    dedup = Deduplicator(args.near_duplicate_threshold)
    for path in tqdm(files, desc="read", unit="file", disable=len(files) < 20):
        yield from file_documents(path, args, report, dedup)


def file_documents(
    path: Path, args: ReadArgs, report: Report, dedup: Deduplicator
) -> Iterator[str]:
    """The documents kept from one file; each one dropped is counted under its reason."""
    encoding = detect_encoding(path)
    if encoding is None:
        report.warn(f"{path}: binary or undecodable text; skipped the file")
        report.drop("encoding")
        return
    if not encoding.is_utf8:
        report.encoding(path, encoding)
    is_html = path.suffix.lower() in (".html", ".htm")
    try:
        for number, raw in enumerate(read_records(path, encoding, args, report)):
            report.read.update(documents=1, characters=len(raw))
            text = clean(raw, is_html, args.scrub_pii)
            reason = length_problem(text, args) or dedup.check(text, f"{path}#{number}")
            if reason:
                report.drop(reason, raw)
                continue
            report.kept.update(documents=1, characters=len(text))
            report.scripts[script_of(text)] += 1
            if len(report.sample) < TOKEN_SAMPLE:
                report.sample.append(text)
            yield text
    except UnicodeDecodeError:
        report.warn(f"{path}: not valid {encoding.name} past its first MiB; skipped the rest")
        report.drop("encoding")


def check_kept(report: Report, inputs: list[Path], args: ReadArgs) -> None:
    if report.kept["documents"]:
        return
    dropped = ", ".join(
        f"{r} {c['documents']}" for r, c in report.dropped.items() if c["documents"]
    )
    raise UserError(
        f"{', '.join(map(str, inputs))}: no document kept from {report.files} file(s) "
        f"(dropped: {dropped or 'none'}): see the warnings above; a document needs "
        f"{args.min_chars} to {args.max_chars} characters"
    )


def read_prepared(data: Path) -> tuple[list[str], list[str]] | None:
    """The (train, validation) documents of a `prepare` output, else None."""
    manifest = data / MANIFEST
    if not manifest.is_file() or json.loads(manifest.read_text()).get("kind") != "prepare":
        return None
    splits = []
    for name in (TRAIN, VALIDATION):
        lines = (data / name).read_text(encoding="utf-8").splitlines()
        documents = [json.loads(line)["text"] for line in lines if line.strip()]
        if not documents:
            raise UserError(
                f"{data / name}: the prepared split is empty: prepare more text or change "
                "--validation_split_percentage in 'tailorgpt prepare'"
            )
        splits.append(documents)
    return splits[0], splits[1]


def check_ranges(args: PrepareArgs) -> None:
    if not 0 < args.near_duplicate_threshold <= 1:
        raise UserError(
            f"--near_duplicate_threshold {args.near_duplicate_threshold}: give a Jaccard "
            "similarity above 0 and at most 1 (1 turns near-duplicate removal off)"
        )
    if not 0 <= args.validation_split_percentage < 100:
        raise UserError(
            f"--validation_split_percentage {args.validation_split_percentage}: give a "
            "percentage from 0 to under 100"
        )


def prepare(args: PrepareArgs) -> dict[str, Any]:
    """Write DATA_DIR: train.jsonl, validation.jsonl, report.json, manifest.json."""
    check_ranges(args)
    report = Report()
    with atomic_dir(args.output_dir) as work:
        writer = SplitWriter(work, args.validation_split_percentage, args.seed)
        try:
            for text in kept_documents(args.inputs, args, report):
                writer.write(text)
        finally:
            writer.close()
        check_kept(report, args.inputs, args)
        result = summary(report, tokens_per_character(args.tokenizer, report.sample))
        write_json(work / REPORT, result)
        settings = {k: v for k, v in vars(args).items() if k not in ("inputs", "output_dir")}
        write_manifest(work, "prepare", {"inputs": [str(p) for p in args.inputs]}, args=settings)
    return result


def length_problem(text: str, args: ReadArgs) -> str | None:
    if len(text) < args.min_chars:
        return "too_short"
    if len(text) > args.max_chars:
        return "too_long"
    return None


def counts(counter: Counter) -> dict[str, int]:
    return {"documents": counter["documents"], "characters": counter["characters"]}


def summary(report: Report, tokens_per_char: float | None) -> dict[str, Any]:
    return {
        "read": counts(report.read),
        "kept": counts(report.kept),
        "dropped": {reason: counts(c) for reason, c in report.dropped.items()},
        "tokens_per_character": tokens_per_char,
        "scripts": dict(report.scripts),
        "encodings": report.encodings,
        "warnings": report.warnings,
    }


def format_table(result: dict[str, Any]) -> str:
    rows = [("read", result["read"]), ("kept", result["kept"])]
    rows += [(f"dropped: {reason}", counts) for reason, counts in result["dropped"].items()]
    lines = [f"{'':24}{'documents':>12}{'characters':>14}"]
    lines += [f"{name:24}{c['documents']:>12,}{c['characters']:>14,}" for name, c in rows]
    if result["tokens_per_character"] is not None:
        lines.append(f"tokens per character: {result['tokens_per_character']:.3f}")
    lines.append("scripts: " + ", ".join(f"{k} {v}" for k, v in sorted(result["scripts"].items())))
    return "\n".join(lines)
