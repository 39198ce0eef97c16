"""dlm-lsp's diffusion engine: fill the middle between a prefix and a suffix, in parallel.

The public facade (what ``dlm_lsp`` uses)::

    from engine import Engine, SamplingParams, EngineError

    engine = Engine.load("path/to/engine-folder", backend="auto")
    completion = engine.complete(prefix, suffix, SamplingParams(budget_ms=80), stop=lambda: cancelled)
    completion.text, completion.cut, completion.stats

The tools the server's commands build on are public modules of their own:
``engine.bench`` (dlm-bench's items, decoders and metrics), ``engine.eval``
(dlm-eval's harness, middles cut from source trees) and ``engine.progress``.
Everything else (checkpoint reading, export, backends, the sampler's internals)
is reachable from its own module for tools and tests; ``dlm_lsp`` does not use it.
"""

from pathlib import Path

from engine.backends.base import BACKENDS, SERVING_BACKENDS, ModelInfo
from engine.engine import Completion, Engine
from engine.errors import (
    BackendUnavailableError,
    CheckpointError,
    EngineError,
    ExportError,
    InputError,
    ManifestError,
    TokenizerError,
    UnknownFamilyError,
    UnsupportedConfigError,
)
from engine.sampler import (
    MULTI_LINE_LENGTHS,
    SINGLE_LINE_LENGTHS,
    SPAN_CACHE_MODES,
    SamplingParams,
    UnmaskOrder,
    single_line,
)


def default_model_path() -> Path:
    """The engine folder of the default model that ships inside this package."""
    return Path(__file__).resolve().parent / "models" / "default"


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CheckpointError",
    "Completion",
    "Engine",
    "EngineError",
    "ExportError",
    "InputError",
    "ManifestError",
    "MULTI_LINE_LENGTHS",
    "SPAN_CACHE_MODES",
    "ModelInfo",
    "SERVING_BACKENDS",
    "SINGLE_LINE_LENGTHS",
    "SamplingParams",
    "TokenizerError",
    "UnknownFamilyError",
    "UnmaskOrder",
    "UnsupportedConfigError",
    "default_model_path",
    "single_line",
]
