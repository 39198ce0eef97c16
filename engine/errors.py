"""The engine's error hierarchy.

Every failure a user can cause (a wrong folder, a corrupt file, a backend that is
not installed) surfaces as a subclass of :class:`EngineError` whose message says
what is wrong *and* what to do about it. Callers (the language server, the CLIs)
catch ``EngineError`` and show the message; anything else is a bug.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(EngineError):
    """A checkpoint or engine folder is missing, incomplete or unreadable."""


class UnknownFamilyError(CheckpointError):
    """``config.json`` does not name a model family this engine supports."""


class UnsupportedConfigError(CheckpointError):
    """The family is known, but a config value is one the engine cannot run."""


class TokenizerError(CheckpointError):
    """The tokenizer is missing, unreadable, or lacks a special token the family needs."""


class ManifestError(CheckpointError):
    """An engine folder's ``manifest.json`` is missing, malformed or does not match the files."""


class ExportError(EngineError):
    """Converting a checkpoint to ONNX failed, or the exported graphs do not match the reference."""


class BackendUnavailableError(EngineError):
    """The requested backend cannot run here (a package or a device is missing)."""


class InputError(EngineError):
    """A completion request is malformed (bad parameters, unusable text)."""


class CatalogError(EngineError):
    """A model catalog operation failed: an unknown or unsupported name, a failed download, no space."""


class ModelNotPresentError(CatalogError):
    """A catalog model was named that has not been pulled yet (``entry`` says which)."""

    def __init__(self, message: str, entry: object) -> None:
        super().__init__(message)
        self.entry = entry
