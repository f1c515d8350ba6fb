"""Choosing the next token from one row's logits, in transformers' order of processors:
repetition penalty, OpenAI's presence and frequency penalties, logit bias, then temperature,
top-k, top-p. Everything here depends on the row and the request only, never on batch mates."""

from __future__ import annotations

import numpy as np

from service.engine.params import GenerationRequest, TokenLogprob


def process(
    logits: np.ndarray,
    request: GenerationRequest,
    prompt_ids: list[int],
    generated: list[int],
    eos_token_id: int = -1,
) -> np.ndarray:
    """The logits after the request's penalties and bias (a copy when any applies), and the
    tokens that would end it masked while it is under min_tokens."""
    repetition = request.repetition_penalty != 1.0
    counted = request.presence_penalty != 0.0 or request.frequency_penalty != 0.0
    too_short = len(generated) < request.min_tokens
    if not (repetition or counted or request.logit_bias or too_short):
        return logits
    logits = logits.copy()
    if repetition:
        penalize_repetition(logits, np.unique(prompt_ids + generated), request.repetition_penalty)
    if counted and generated:
        # OpenAI's definition: over the tokens generated so far, not the prompt.
        ids, counts = np.unique(generated, return_counts=True)
        logits[ids] -= request.presence_penalty + request.frequency_penalty * counts
    if request.logit_bias:
        logits[list(request.logit_bias)] += np.array(list(request.logit_bias.values()))
    if too_short:  # last: no bias brings them back
        ends = [*request.stop_token_ids, *([eos_token_id] if eos_token_id >= 0 else [])]
        logits[ends] = -np.inf
    return logits


def logprob_of(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The token's log-probability under the model's own distribution (before penalties and
    sampling settings, as vLLM reports it) and the `top` likeliest tokens'."""
    shifted = logits.astype(np.float64) - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-logprobs, top - 1)[:top] if top else np.array([], dtype=np.int64)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(token, float(logprobs[token]), [(int(i), float(logprobs[i])) for i in best])


def penalize_repetition(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """CTRL's penalty, in place: seen tokens' logits move towards "less likely"."""
    values = logits[seen]
    logits[seen] = np.where(values < 0, values * penalty, values / penalty)


def choose(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator
) -> int:
    """Greedy when temperature is 0; else a draw from the kept tokens.

    Exactly one random number per token, so a seeded request draws the same sequence
    whatever else shares its batch.
    """
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    candidates = np.arange(len(scaled))
    if 0 < top_k < len(scaled):
        candidates = np.argpartition(-scaled, top_k - 1)[:top_k]
    probs = np.exp(scaled[candidates] - scaled[candidates].max())
    probs /= probs.sum()
    if top_p < 1.0:
        candidates, probs = _nucleus(candidates, probs, top_p)
    cumulative = np.cumsum(probs)
    pick = min(
        int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")),
        len(candidates) - 1,
    )
    return int(candidates[pick])


def _nucleus(
    candidates: np.ndarray, probs: np.ndarray, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """The most likely tokens whose mass reaches top_p, most likely first.

    Sorting a 50k vocabulary every step costs milliseconds per row; the nucleus is nearly
    always within the top few hundred, so widen a partial selection until it holds top_p.
    """
    width = min(len(probs), 64)
    while True:
        top = (
            np.argpartition(-probs, width - 1)[:width]
            if width < len(probs)
            else np.arange(len(probs))
        )
        top = top[np.argsort(-probs[top], kind="stable")]
        cumulative = np.cumsum(probs[top])
        if cumulative[-1] >= top_p or width == len(probs):
            break
        width = min(len(probs), width * 8)
    keep = top[: int(np.searchsorted(cumulative, top_p)) + 1]
    return candidates[keep], probs[keep] / probs[keep].sum()
