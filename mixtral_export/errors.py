"""The errors a user can cause by what they feed the tool: the CLI prints them as one line."""
from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is the whole story (no traceback).

    Listed by module so a command that never touched torch does not import it to catch an error.
    """
    from graphs.contract import ContractError
    from mixtral_export.config import ConfigError
    from runtimes.step import RequestError

    found: list[type[BaseException]] = [ConfigError, ContractError, RequestError]
    for module, name in (("mixtral_export.safetensors_file", "CheckpointError"),
                         ("mixtral_export.tokenizer", "TokenizerError"),
                         ("mixtral_export.tokenizer", "ChatFormatError"),
                         ("graphs.manifest", "ManifestError"),
                         ("graphs.artifact_folder", "ExportError"),
                         ("runtimes.load", "RuntimeLoadError"),
                         ("runtimes.ort", "OrtBackendError"),
                         ("graphs.trt_compat", "TrtCompatError"),
                         ("graphs.trt_engine", "TrtUnavailable"),
                         ("graphs.trt_engine", "TrtBuildError")):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)
