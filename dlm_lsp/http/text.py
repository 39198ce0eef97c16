"""Shaping a completion for an API: stop strings, indentation, finish reasons, token counts, timings."""

from __future__ import annotations

from typing import Any

from dlm_lsp.completion import Result


def with_stops(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string; and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def within_indent(text: str, n_indent: int) -> str:
    """llama.cpp's ``n_indent``: end before a later line indented less than ``n_indent`` columns."""
    if n_indent <= 0:
        return text
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and len(line) - len(line.lstrip(" \t")) < n_indent:
            return "\n".join(lines[:i])
    return text


def finish_reason(result: Result, max_tokens: int | None, stopped: bool) -> str:
    """``length`` when the middle ran out of tokens or time, else ``stop``."""
    stats = result.engine_stats
    full = max_tokens is not None and stats.get("middle_tokens", 0) >= max_tokens
    return "length" if not stopped and (result.cut or full) else "stop"


def usage(result: Result) -> dict[str, int]:
    """OpenAI-style token counts."""
    prompt = int(result.engine_stats.get("context_tokens", 0))
    written = int(result.engine_stats.get("middle_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": written, "total_tokens": prompt + written}


def timings(result: Result) -> dict[str, Any]:
    """llama.cpp's ``timings``: the context pass as the prompt, the denoising steps as the prediction."""
    stats = result.engine_stats
    prompt_n = int(stats.get("context_tokens", 0))
    prompt_ms = float(stats.get("tokenize_ms", 0.0)) + float(stats.get("context_ms", 0.0))
    predicted_n = int(stats.get("middle_tokens", 0))
    predicted_ms = max(0.0, float(stats.get("total_ms", result.latency_ms)) - prompt_ms)
    return {
        "prompt_n": prompt_n, "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": round(prompt_ms / prompt_n, 3) if prompt_n else 0.0,
        "prompt_per_second": round(1000 * prompt_n / prompt_ms, 3) if prompt_ms else 0.0,
        "predicted_n": predicted_n, "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": round(predicted_ms / predicted_n, 3) if predicted_n else 0.0,
        "predicted_per_second": round(1000 * predicted_n / predicted_ms, 3) if predicted_ms else 0.0,
    }
