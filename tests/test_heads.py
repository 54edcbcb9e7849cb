"""The non-generative heads (MixtralModel, sequence/token classification, question answering) against
transformers' own classes, on tiny checkpoints their save_pretrained wrote: eager and ORT, left- and
right-padded batches, with and without pad_token_id. Compared at real tokens only (outputs at
padding columns are not defined); fp32 max |diff| <= 1e-4."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixtral_export.artifact.config import ConfigError
from tests.reference_models import hf_head_reference, random_prompts

HEADS = ("model", "sequence-classification", "token-classification", "question-answering")
SEQ_LEN = 12
PROMPTS = random_prompts([5, 12, 1], 128, seed=3)  # 3 rows on a batch-2 graph: two runs, one full row


@pytest.fixture(scope="module", params=[(head, pad) for head in HEADS for pad in (None, 0)],
                ids=lambda p: f"{p[0]}-pad{p[1]}")
def reference(request, tmp_path_factory):
    head, pad = request.param
    folder = tmp_path_factory.mktemp("heads") / f"{head}-{pad}"
    return head, pad, folder, hf_head_reference(folder, head, pad_token_id=pad)


def padded(prompts, side: str, pad: int | None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(prompts), SEQ_LEN), 0 if pad is None else pad, dtype=np.int64)  # (B, T)
    mask = np.zeros((len(prompts), SEQ_LEN), dtype=np.int64)  # (B, T)
    for row, prompt in enumerate(prompts):
        columns = slice(SEQ_LEN - len(prompt), SEQ_LEN) if side == "left" else slice(0, len(prompt))
        ids[row, columns], mask[row, columns] = prompt, 1
    return ids, mask


def hf_outputs(model, head: str, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """transformers' outputs row by row (its sequence classifier refuses batches without a pad id)."""
    rows = []
    with torch.no_grad():
        for r in range(len(ids)):
            out = model(input_ids=torch.from_numpy(ids[r:r + 1]), attention_mask=torch.from_numpy(mask[r:r + 1]))
            rows.append({"model": {"last_hidden_state": getattr(out, "last_hidden_state", None)},
                         "sequence-classification": {"logits": out.get("logits")},
                         "token-classification": {"logits": out.get("logits")},
                         "question-answering": {"start_logits": out.get("start_logits"),
                                                "end_logits": out.get("end_logits")}}[head])
    return {name: np.concatenate([row[name].float().numpy() for row in rows]) for name in rows[0]}


def max_diff(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> float:
    if ours.ndim >= 2 and ours.shape[1] == SEQ_LEN:  # per-token output: real tokens only
        keep = mask.astype(bool)
        return float(np.abs(ours[keep] - theirs[keep]).max())
    return float(np.abs(ours - theirs).max())


@pytest.mark.parametrize("side", ["left", "right"])
def test_eager_head_model_matches_transformers(reference, side):
    from mixtral_export.checkpoint import load_head_model

    head, pad, folder, ref = reference
    if head == "sequence-classification" and pad is None and side == "right":
        pytest.skip("without a pad id transformers pools at the last column: only left padding is meaningful")
    model = load_head_model(folder)
    assert model.head.kind == head
    ids, mask = padded(PROMPTS, side, pad)
    with torch.no_grad():
        ours = [t.numpy() for t in model(torch.from_numpy(ids), torch.from_numpy(mask))]
    theirs = hf_outputs(ref, head, ids, mask)
    assert len(ours) == len(theirs)
    for got, (name, want) in zip(ours, theirs.items()):
        assert got.shape == want.shape, name
        assert max_diff(got, want, mask) <= 1e-4, name


def test_head_is_read_from_architectures_and_tensors(reference):
    from mixtral_export.checkpoint import checkpoint_tensors
    from mixtral_export.head import read_head

    head, _, folder, _ = reference
    shapes = {key: entry.shape for key, entry in checkpoint_tensors(folder).items()}
    found = read_head(folder, shapes)
    assert found.kind == head
    assert found.labels == (("class-0", "class-1", "class-2") if "classification" in head else ())
    assert read_head(folder, shapes, "model").kind == "model"  # the bare model from any head
    if head != "model":
        with pytest.raises(ConfigError, match="no lm_head.weight"):
            read_head(folder, shapes, "causal-lm")


def test_bare_model_from_a_causal_lm_checkpoint(tmp_path):
    from mixtral_export.checkpoint import load_head_model
    from tests.reference_models import hf_reference

    lm = hf_reference(tmp_path / "lm")
    model = load_head_model(tmp_path / "lm", head="model")
    ids, mask = padded(PROMPTS[:2], "left", None)
    with torch.no_grad():
        ours = model(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy()
        theirs = lm.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert max_diff(ours, theirs.numpy(), mask) <= 1e-4


def test_causal_lm_checkpoint_without_head_override_is_refused(tmp_path):
    from mixtral_export.checkpoint import load_head_model
    from mixtral_export.safetensors_file import CheckpointError
    from tests.reference_models import hf_reference

    hf_reference(tmp_path / "lm")
    with pytest.raises(CheckpointError, match="causal LM"):
        load_head_model(tmp_path / "lm")


@pytest.fixture(scope="module")
def artifact(reference, tmp_path_factory):
    from mixtral_export.graphs.onnx_heads import export_head_onnx

    head, pad, folder, _ = reference
    return export_head_onnx(folder, tmp_path_factory.mktemp("head-onnx") / f"{head}-{pad}", batch=2, seq_len=SEQ_LEN)


@pytest.mark.parametrize("runtime", ["ort", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_runtime_scores_match_transformers(reference, artifact, runtime, side):
    from mixtral_export.runtimes.heads import padded_batch, score
    from mixtral_export.runtimes.load import open_backend

    head, pad, _, ref = reference
    backend, manifest = open_backend(artifact, runtime)
    assert manifest.head == head and backend.shapes.head == head
    if head == "sequence-classification" and pad is None and side == "right":
        from mixtral_export.runtimes.step import RequestError

        with pytest.raises(RequestError, match="pad on the left"):
            score(backend, PROMPTS, pad, side)
        return
    results = score(backend, PROMPTS, pad, side)
    assert [r.token_ids for r in results] == PROMPTS
    for prompt, result in zip(PROMPTS, results):
        ids, mask = padded_batch([prompt], backend.shapes, pad, side)
        theirs = hf_outputs(ref, head, ids[:1], mask[:1])
        keep = mask[0].astype(bool)
        for name, want in theirs.items():
            want = want[0][keep] if want.ndim >= 2 and want.shape[1] == SEQ_LEN else want[0]
            got = result.outputs[name]
            assert got.shape == want.shape, name
            assert float(np.abs(got - want).max()) <= 1e-4, (name, runtime, side)


def test_manifest_records_the_head_and_its_io(reference, artifact):
    from mixtral_export.artifact.contract import HEAD_OUTPUT_NAMES
    from mixtral_export.artifact.manifest import load_manifest

    head, _, _, _ = reference
    manifest = load_manifest(artifact)
    assert manifest.head == head and manifest.graphs == {"head": "model.onnx"}
    assert [e["name"] for e in manifest.io["outputs"]] == list(HEAD_OUTPUT_NAMES[head])
    assert [e["shape"] for e in manifest.io["inputs"]] == [[2, SEQ_LEN], [2, SEQ_LEN]]
    assert manifest.labels == (("class-0", "class-1", "class-2") if "classification" in head else ())



def test_verify_passes_for_every_head(reference, artifact):
    from mixtral_export.runtimes.verify_heads import verify_head_artifact

    head, pad, _, _ = reference
    report = verify_head_artifact(artifact, ["eager", "ort"], reference="hf")
    assert report.passed, report.to_json()
    sides = {c.padding for c in report.comparisons}
    assert sides == ({"left"} if head == "sequence-classification" and pad is None else {"left", "right"})
    judged = {(c.comparison.runtime, c.comparison.against, c.output) for c in report.comparisons}
    from mixtral_export.artifact.contract import HEAD_OUTPUT_NAMES

    assert judged == {(r, a, o) for r, a in (("ort", "eager"), ("eager", "hf"), ("ort", "hf"))
                      for o in HEAD_OUTPUT_NAMES[head]}
    assert max(c.comparison.max_abs for c in report.comparisons) <= 1e-4


def test_verify_fails_when_an_output_is_off(classifier):
    """The comparison can fail: a runtime whose outputs are shifted by 1e-3 is outside the fp32 tolerance."""
    from mixtral_export.runtimes.load import open_backend
    from mixtral_export.runtimes.verify_heads import default_head_prompts, verify_heads

    good, manifest = open_backend(classifier, "ort")
    pad = manifest.config.pad_token_id

    class Off:
        name, shapes = "off", good.shapes

        def run(self, ids, mask):
            return {k: v + 1e-3 for k, v in good.run(ids, mask).items()}

    prompts = default_head_prompts(None, good.shapes, 128)
    report = verify_heads({"ort": good, "off": Off()}, prompts, pad, "float32")
    assert not report.passed
    assert all(0.9e-3 < c.comparison.max_abs < 1.1e-3 for c in report.comparisons)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A sequence classifier with a pad id exported through the CLI (batch 2, T 16)."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("cli-heads")
    hf_head_reference(folder / "ck", "sequence-classification", pad_token_id=0, num_labels=2)
    subprocess.run([sys.executable, "-m", "mixtral_export", "export", str(folder / "ck"), "-o", str(folder / "art"),
                    "--batch", "2", "--seq-len", "16"], check=True, capture_output=True)
    return folder / "art"


def cli(*args):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "mixtral_export", *map(str, args)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])


def test_cli_score_prints_labels_and_json(classifier):
    import json

    result = cli("score", classifier, "--input-ids", "5,6,7", "--input-ids", "9,10", "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["head"] == "sequence-classification" and found["labels"] == ["class-0", "class-1"]
    assert [r["token_ids"] for r in found["results"]] == [[5, 6, 7], [9, 10]]
    for r in found["results"]:
        assert r["label"] == max(r["logits"], key=r["logits"].get)
    right = json.loads(cli("score", classifier, "--input-ids", "5,6,7", "--padding", "right", "--json").stdout)
    assert right["results"][0]["logits"] == pytest.approx(found["results"][0]["logits"], abs=1e-4)


def test_cli_refuses_what_a_head_artifact_cannot_do(classifier):
    for args, message in ((("generate", classifier, "--input-ids", "1,2"), "does not generate"),
                          (("score", classifier, "--input-ids", ",".join(["5"] * 17)), "at most 16"),
                          (("score", classifier, "--input-ids", "5", "--padding", "middle"), "padding 'middle'"),
                          (("score", classifier, "--prompt", "hi"), "no tokenizer.model")):
        result = cli(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cli_verify_of_a_head_artifact(classifier):
    import json

    result = cli("verify", classifier, "--runtimes", "eager,ort", "--reference", "hf", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["passed"]


def test_session_on_a_head_artifact_needs_no_torch(classifier):
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from mixtral_export import HeadSession; s = HeadSession.open(sys.argv[1], runtime='ort'); "
            "r = s.score_ids([[5, 6, 7]])[0]; assert r.outputs['logits'].shape == (2,); "
            "assert s.labels == ('class-0', 'class-1'); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(classifier)], cwd=Path(__file__).resolve().parents[1], check=True)


def test_tampered_head_io_is_refused(classifier, tmp_path):
    import json
    import shutil

    from mixtral_export.artifact.manifest import ManifestError, load_manifest

    copy = tmp_path / "art"
    shutil.copytree(classifier, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["io"]["outputs"][0]["shape"] = [2, 5]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="head contract"):
        load_manifest(copy)


def test_bare_model_exported_from_a_causal_lm_with_gathered_experts(tmp_path):
    """--head model on a causal-LM checkpoint (lm_head ignored), routing gather: ORT and eager match
    transformers' MixtralModel loaded from the same checkpoint."""
    from mixtral_export.graphs.onnx_heads import export_head_onnx
    from mixtral_export.runtimes.verify_heads import verify_head_artifact
    from tests.reference_models import hf_reference

    hf_reference(tmp_path / "lm")
    artifact = export_head_onnx(tmp_path / "lm", tmp_path / "art", head="model", batch=2, seq_len=SEQ_LEN,
                                routing="gather")
    report = verify_head_artifact(artifact, ["eager", "ort"], reference="hf")
    assert report.head == "model" and report.passed, report.to_json()


def test_session_classify_names_labels_from_id2label(classifier):
    from mixtral_export.runtimes.head_session import HeadSession
    from mixtral_export.runtimes.step import RequestError

    session = HeadSession.open(classifier, runtime="ort")

    class Words:  # a stand-in tokenizer: one id per word
        def encode(self, text, bos=True):
            return [3 + len(word) for word in text.split()]

    session.tokenizer = Words()
    texts = ["a tiny test", "another one here please"]
    labels = session.classify(texts)
    logits = [r.outputs["logits"] for r in session.score(texts)]
    assert labels == [session.labels[int(x.argmax())] for x in logits] and set(labels) <= {"class-0", "class-1"}
    assert session.classify(texts[0]) == labels[0]
    with pytest.raises(RequestError, match="padding 'middle'"):
        session.score_ids([[5]], padding="middle")


def test_float16_head_graph_agrees_with_transformers(classifier, tmp_path):
    from mixtral_export.graphs.onnx_heads import export_head_onnx
    from mixtral_export.runtimes.verify_heads import verify_head_artifact

    artifact = export_head_onnx(classifier.parent / "ck", tmp_path / "fp16", dtype="float16", batch=2, seq_len=16)
    report = verify_head_artifact(artifact, ["ort"], reference="hf")
    assert report.dtype == "float16" and report.passed, report.to_json()
    assert all(c.comparison.top1_agreement == 1.0 for c in report.comparisons)
    assert max(c.comparison.max_abs for c in report.comparisons) < 0.05  # fp16 weights: ~3e-3 measured


def test_each_session_refuses_the_other_kind(classifier, tiny_onnx):
    """A head artifact does not open as a Session, a causal-LM one not as a HeadSession: one line
    naming the folder and the class (and command) that runs it."""
    from mixtral_export import HeadSession, Session, UserError

    for opener, artifact, names in ((Session.open, classifier, ("does not generate", "HeadSession", "score")),
                                    (HeadSession.open, tiny_onnx, ("no head to score", "Session", "generate"))):
        with pytest.raises(UserError) as info:
            opener(artifact)
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(artifact)), message
        assert all(name in message for name in names), message
    result = cli("score", tiny_onnx, "--input-ids", "1,2")
    assert result.returncode == 2 and "no head to score" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", HEADS)
def test_tiny_head_checkpoint_exports_scores_and_verifies(kind, tmp_path):
    """`tiny --head KIND` writes the checkpoint transformers' class saves (its architectures entry,
    id2label for a classifier); export, score and verify --reference hf run on it as a user types them."""
    import json

    from mixtral_export.tiny import TINY_LABELS
    from tests.reference_models import HEAD_CLASSES

    checkpoint, artifact = tmp_path / "tiny-head", tmp_path / "tiny-head-onnx"
    for args in (("tiny", checkpoint, "--head", kind), ("export", checkpoint, "-o", artifact, "--batch", "2",
                                                        "--seq-len", "16")):
        result = cli(*args)
        assert result.returncode == 0, result.stderr
    config = json.loads((checkpoint / "config.json").read_text())
    classifies = kind in ("sequence-classification", "token-classification")
    assert config["architectures"] == [HEAD_CLASSES[kind]]
    assert config.get("id2label") == ({str(i): name for i, name in enumerate(TINY_LABELS)} if classifies else None)
    result = cli("score", artifact, "--prompt", "The quick brown fox", "--prompt", "jumps", "--json")
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    assert scored["head"] == kind and scored["labels"] == (list(TINY_LABELS) if classifies else [])
    assert len(scored["results"]) == 2 and all(r["token_ids"][0] == 1 for r in scored["results"])  # BOS first
    result = cli("verify", artifact, "--runtimes", "eager,ort", "--reference", "hf", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["head"] == kind
    assert max(c["max_abs"] for c in report["comparisons"]) <= 1e-4


def test_tiny_refuses_an_unknown_head(tmp_path):
    result = cli("tiny", tmp_path / "ck", "--head", "regression")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--head 'regression'" in lines[0], result.stderr
    assert not (tmp_path / "ck").exists()
