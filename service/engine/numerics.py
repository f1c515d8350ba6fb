"""The int8 variant's numerics on this CPU: the flags that choose its kernels, and a re-check.

On x86, onnxruntime multiplies the int8 graph's u8 activations by s8 weights in one of two
ways: with VNNI (or AMX) the products are summed in int32, exactly; without it (AVX2 only),
`vpmaddubsw` first sums each pair of u8 x s8 products in int16, which saturates past 32,767.
The export's weights use 7 bits (|w| <= 63), so a pair never exceeds 255 * 63 * 2 = 32,130:
both paths give the same sums. `recheck` proves it on the serving machine when its CPU differs
from the one parity was measured on.

    python -m service.engine.numerics EXPORT_DIR IDS.npy LOGITS.npy [--variant int8]
        [--kv_cache_dtype int8]

decodes held-out ids through the runner and saves the logits: run under an emulated CPU
(`qemu-x86_64 -cpu Haswell`) it shows what an AVX2-only machine computes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from artifacts import PARITY, PARITY_SAMPLE
from service.engine.runner import ModelRunner

log = logging.getLogger(__name__)
# The CPU features that decide which integer matrix kernel onnxruntime runs.
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2")
RECHECK_TOLERANCE = 1e-3  # relative perplexity change on the sample that passes the re-check


def cpu_flags() -> list[str]:
    """Which of INT8_FLAGS this CPU has (empty where /proc/cpuinfo does not exist)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in cpuinfo.splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    return [flag for flag in INT8_FLAGS if flag in flags]


def decode_logits(runner: ModelRunner, blocks: np.ndarray) -> np.ndarray:
    """Each block decoded token by token through the runner's cache: [blocks, steps, vocab],
    the logits after every token but the last."""
    steps = blocks.shape[1] - 1
    return np.stack(
        [runner.decode(blocks[:, t], np.full(len(blocks), t)).copy() for t in range(steps)], 1
    )


def nll(logits: np.ndarray, blocks: np.ndarray) -> float:
    """Summed negative log-likelihood of each block's next tokens under `logits`."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    targets = blocks[:, 1 : logits.shape[1] + 1]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float((log_norm - picked).sum())


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens)


def recheck(runner: ModelRunner, model_dir: Path, variant: str) -> dict[str, Any] | None:
    """When this CPU's flags differ from those parity was measured with, decode the parity
    sample again and compare its perplexity with the export machine's; warn past
    RECHECK_TOLERANCE. None when there is nothing to re-check."""
    parity_path, sample_path = model_dir / PARITY, model_dir / PARITY_SAMPLE
    if runner.device != "cpu" or not (parity_path.is_file() and sample_path.is_file()):
        return None
    measured_with = json.loads(parity_path.read_text()).get("cpu_flags")
    here = cpu_flags()
    sample = json.loads(sample_path.read_text())
    if measured_with in (None, here) or variant not in sample["nll"]:
        return None
    blocks = np.array(sample["input_ids"])
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    there = perplexity(sample["nll"][variant], tokens)
    drift = perplexity(nll(decode_logits(runner, blocks), blocks), tokens) / there - 1
    message = (
        f"{variant} parity was measured on a CPU with {measured_with}; this one has {here}. "
        f"Re-checked on {tokens} held-out tokens: perplexity {drift:+.5%} from the export's"
    )
    if abs(drift) > RECHECK_TOLERANCE:
        log.warning(
            "%s, past the %g tolerance: serve the fp32 variant on this CPU",
            message,
            RECHECK_TOLERANCE,
        )
    else:
        log.info("%s: within tolerance", message)
    return {"cpu_flags": here, "measured_with": measured_with, "perplexity_drift": drift}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("ids", type=Path, help=".npy file of token ids [blocks, tokens]")
    parser.add_argument("output", type=Path, help=".npy file the logits are written to")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--kv_cache_dtype", default="fp32")
    args = parser.parse_args()
    blocks = np.load(args.ids)
    runner = ModelRunner(
        args.model_dir, args.variant, len(blocks), 1, kv_cache_dtype=args.kv_cache_dtype
    )
    np.save(args.output, decode_logits(runner, blocks))


if __name__ == "__main__":
    main()
