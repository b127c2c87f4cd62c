"""Errors a user can act on. The CLI prints them as one line and exits 1 (2 for an OptionError)."""


class EdgeMLLMError(Exception):
    """Base class for every error edge-mllm reports to a user."""


class ConfigError(EdgeMLLMError):
    """A model configuration is invalid or unsupported."""


class OptionError(ConfigError):
    """An option that does not go with the model, bundle or prompt it was given (found only once that
    input is read). The CLI reports it as a usage error: exit 2."""


class CheckpointError(EdgeMLLMError):
    """A model file or folder is missing, corrupt, truncated or of an unknown layout."""


class ImageError(EdgeMLLMError):
    """An image could not be read or converted."""


class ContextLengthError(EdgeMLLMError):
    """Prompt + image tokens + new tokens do not fit the model's context."""


class QuantError(EdgeMLLMError):
    """A quantization scheme, group size or quantized file is invalid or unsupported."""


class OutputError(EdgeMLLMError):
    """An output folder cannot be written, or holds something that must not be replaced."""
