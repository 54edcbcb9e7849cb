"""MixtralConfig as Hugging Face writes it in config.json, read once and validated there.

Torch-free: the ORT runtime reads the config from an artifact's manifest with this module.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mixtral_export.artifact.contract import FLOAT_DTYPES as DTYPES
from mixtral_export.errors import UserError

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}


class ConfigError(UserError, ValueError):
    """An impossible or unsupported config; the message is one line naming the field and file."""


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self, source: str = "config") -> None:
        def fail(field: str, why: str) -> None:
            raise ConfigError(f"{source}: {field} {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"({self.num_key_value_heads}) must divide "
                 f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            fail("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            fail("num_experts_per_tok", f"({self.num_experts_per_tok}) must not exceed "
                 f"num_local_experts ({self.num_local_experts})")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"{self.hidden_act!r} is not supported (one of {', '.join(ACTIVATIONS)})")
        if self.sliding_window is not None and (
                isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
                or self.sliding_window <= 0):
            fail("sliding_window", f"must be a positive integer or null, got {self.sliding_window!r}")
        if not self.rms_norm_eps > 0:
            fail("rms_norm_eps", f"must be positive, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta!r}")
        if self.dtype not in DTYPES:
            fail("dtype", f"{self.dtype!r} is not supported (one of {', '.join(DTYPES)})")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                fail(name, f"({value}) is outside the vocabulary (0..{self.vocab_size - 1})")
        for value in self.eos_token_id:
            if not 0 <= value < self.vocab_size:
                fail("eos_token_id", f"({value}) is outside the vocabulary (0..{self.vocab_size - 1})")

    # ---- reading and writing config.json ----

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "MixtralConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        model_type = raw.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ConfigError(f"{source}: model_type {model_type!r} is not 'mixtral'")

        def need(name: str):
            if name not in raw:
                raise ConfigError(f"{source}: {name} is missing")
            return raw[name]

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        kv_heads = raw.get("num_key_value_heads")
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if not (isinstance(heads, int) and isinstance(hidden, int)) or heads <= 0 or hidden % heads:
                raise ConfigError(f"{source}: head_dim is null and hidden_size ({hidden}) "
                                  f"is not divisible by num_attention_heads ({heads})")
            head_dim = hidden // heads
        eos = raw.get("eos_token_id", 2)
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        dtype = _DTYPE_ALIASES.get(dtype, dtype)
        try:
            config = cls(
                vocab_size=need("vocab_size"),
                hidden_size=hidden,
                intermediate_size=need("intermediate_size"),
                num_hidden_layers=need("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=heads if kv_heads is None else kv_heads,
                head_dim=head_dim,
                hidden_act=raw.get("hidden_act", "silu"),
                max_position_embeddings=raw.get("max_position_embeddings", 32768),
                rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
                rope_theta=_rope_theta(raw, source),
                sliding_window=raw.get("sliding_window"),
                num_local_experts=raw.get("num_local_experts", 8),
                num_experts_per_tok=raw.get("num_experts_per_tok", 2),
                bos_token_id=raw.get("bos_token_id", 1),
                eos_token_id=eos,
                pad_token_id=raw.get("pad_token_id"),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                dtype=dtype,
            )
        except ConfigError as err:
            raise ConfigError(str(err).replace("config:", f"{source}:", 1)) from None
        except TypeError as err:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: {err}") from None
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "MixtralConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_config_json(path), source=str(path))

    def to_dict(self) -> dict:
        """The config as Hugging Face's config.json (transformers v5 spelling)."""
        out = asdict(self)
        rope_theta = out.pop("rope_theta")
        eos = list(self.eos_token_id)
        out.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            eos_token_id=eos[0] if len(eos) == 1 else eos,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
            rope_theta=rope_theta,  # the pre-v5 key, so older transformers read it too
            attention_dropout=0.0,
            router_jitter_noise=0.0,
        )
        return out

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes) -> "MixtralConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return MixtralConfig(**values)


def read_config_json(path: Path) -> dict:
    """config.json as a dict; a missing or malformed file is one ConfigError line naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def _rope_theta(raw: dict, source: str) -> float:
    """rope_theta from the old top-level key or the new rope_parameters/rope_scaling dicts."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for block, name in ((params, "rope_parameters"), (scaling, "rope_scaling")):
        if not isinstance(block, dict):
            raise ConfigError(f"{source}: {name} must be an object")
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in ("default", None):
            raise ConfigError(f"{source}: {name}.rope_type {kind!r} is not supported (only 'default')")
    theta = params.get("rope_theta", raw.get("rope_theta", 1e6))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"{source}: rope_theta must be a number, got {theta!r}")
    return float(theta)
