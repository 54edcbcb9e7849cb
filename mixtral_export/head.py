"""Which head a checkpoint carries, read once from config.json and the tensors it holds.

transformers ships Mixtral as five classes; save_pretrained writes the trunk under `model.` (bare
under MixtralModel) and each head's own tensors beside it. The head is what config.json's
`architectures` names, checked against those tensors; `--head` overrides it where the tensors allow
(the bare model from any checkpoint, say). Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixtral_export.artifact.contract import CLASSIFIER_KINDS, HEAD_KINDS

from mixtral_export.artifact.config import ConfigError, read_config_json

CAUSAL_LM = "causal-lm"  # the generative head: exported as the step graph, not a head graph
HEADS = (CAUSAL_LM, *HEAD_KINDS)
ARCHITECTURES = {"MixtralForCausalLM": CAUSAL_LM, "MixtralModel": "model",
                 "MixtralForSequenceClassification": "sequence-classification",
                 "MixtralForTokenClassification": "token-classification",
                 "MixtralForQuestionAnswering": "question-answering"}
# The tensors each head adds to the trunk: name -> required (False: optional, e.g. a bias)
HEAD_TENSORS = {CAUSAL_LM: {"lm_head.weight": True}, "model": {},
                "sequence-classification": {"score.weight": True},
                "token-classification": {"score.weight": True, "score.bias": False},
                "question-answering": {"qa_outputs.weight": True, "qa_outputs.bias": True}}
ALL_HEAD_TENSORS = frozenset(name for names in HEAD_TENSORS.values() for name in names)


@dataclass(frozen=True)
class Head:
    kind: str  # one of HEADS
    labels: tuple[str, ...] = ()  # label name of each class id (classification heads)
    bias: bool = False  # the head's Linear has a bias (token classification may; question answering does)

    def __post_init__(self) -> None:
        if self.kind not in HEADS:
            raise ConfigError(f"head {self.kind!r} is not one of {', '.join(HEADS)}")
        classifies = self.kind in CLASSIFIER_KINDS
        if classifies != bool(self.labels):
            raise ConfigError(f"the {self.kind} head {'needs' if classifies else 'has no'} labels")

    @property
    def generates(self) -> bool:
        """The causal LM: exported as the step graph and run by Session; every other head is scored."""
        return self.kind == CAUSAL_LM

    @property
    def num_labels(self) -> int:
        """Rows of the head's Linear: labels, 2 for question answering (start, end), 0 for the bare model."""
        return 2 if self.kind == "question-answering" else len(self.labels)


def read_head(folder: str | Path, tensors: dict[str, tuple[int, ...]], override: str | None = None) -> Head:
    """The head of the checkpoint in `folder` given its tensors (name -> shape); `override` picks another."""
    path = Path(folder) / "config.json"
    raw = read_config_json(path)
    architectures = raw.get("architectures") or []
    declared = ARCHITECTURES.get(architectures[0]) if isinstance(architectures, list) and architectures else None
    bare = "embed_tokens.weight" in tensors and "model.embed_tokens.weight" not in tensors
    if override is not None and override not in HEADS:
        raise ConfigError(f"--head {override!r} is not one of {', '.join(HEADS)}")
    kind = override or declared or _infer(tensors, bare, raw.get("tie_word_embeddings", False), path)
    if bare and kind != "model":
        raise ConfigError(f"{path}: the checkpoint is a bare MixtralModel (no model. prefix); it has no "
                          f"{kind} head (--head model)")
    tied = kind == CAUSAL_LM and bool(raw.get("tie_word_embeddings", False))
    for name, required in HEAD_TENSORS[kind].items():
        if required and name not in tensors and not (tied and name == "lm_head.weight"):
            why = f"names {architectures[0]}" if kind == declared else f"was asked for {kind}"
            raise ConfigError(f"{path}: {why}, but the checkpoint has no {name} tensor")
    labels = _labels(raw, tensors, path) if kind in CLASSIFIER_KINDS else ()
    bias = kind == "question-answering" or (kind == "token-classification" and "score.bias" in tensors)
    return Head(kind=kind, labels=labels, bias=bias)


def _infer(tensors: dict, bare: bool, tied: bool, path: Path) -> str:
    """The head the tensors alone imply, for a config.json without (Mixtral) architectures."""
    if bare:
        return "model"
    if "qa_outputs.weight" in tensors:
        return "question-answering"
    if "score.weight" in tensors:
        raise ConfigError(f"{path}: no Mixtral architectures entry and a score head: pass --head "
                          f"sequence-classification or --head token-classification")
    if "lm_head.weight" in tensors or tied:
        return CAUSAL_LM
    return "model"


def _labels(raw: dict, tensors: dict, path: Path) -> tuple[str, ...]:
    """Label names by id from id2label (keys "0".."N-1"), N checked against the score rows."""
    rows = tensors["score.weight"][0]
    id2label = raw.get("id2label")
    if id2label is None:
        return tuple(f"LABEL_{i}" for i in range(rows))
    try:
        by_id = {int(key): str(value) for key, value in dict(id2label).items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: id2label must map class ids to names") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ConfigError(f"{path}: id2label ids must be 0..N-1, got {sorted(by_id)}")
    if len(by_id) != rows:
        raise ConfigError(f"{path}: id2label names {len(by_id)} labels but score.weight has {rows} rows")
    return tuple(by_id[i] for i in range(rows))
