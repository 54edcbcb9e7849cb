"""Train a sentencepiece tokenizer.model the way Llama/Mistral's was trained (byte-fallback BPE)."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import sentencepiece as spm

CORPUS_PATH = Path(__file__).parent / "data" / "tiny_corpus.txt"


def load_tiny_corpus() -> str:
    """The English corpus the repo ships for the tiny model's tokenizer."""
    return CORPUS_PATH.read_text(encoding="utf-8")


def train_tokenizer(text: str, out_path: str | Path, vocab_size: int = 1000) -> Path:
    """Train on `text` (one sentence per line) and write the model atomically to `out_path`.

    Same text and vocab_size give a byte-identical file: one thread, every sentence, no shuffle.
    """
    out_path = Path(out_path)
    sentences = [line for line in text.splitlines() if line.strip()]
    if not sentences:
        raise ValueError("train_tokenizer: the training text has no non-blank lines")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        character_coverage=0.9995, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=1 << 16, minloglevel=2,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path
