"""The public Python API services embed: open an artifact, generate or stream text."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from mixtral_export.runtimes.session import Session

REPO = Path(__file__).resolve().parents[1]


def test_stream_yields_the_text_generate_returns(tiny_onnx):
    session = Session.open(tiny_onnx)
    text = session.generate("Simple is better", max_new_tokens=20)
    assert "".join(session.stream("Simple is better", max_new_tokens=20)) == text
    assert session.last_result.completions[0].text == text


def test_batch_of_prompts_matches_one_at_a_time(tiny_onnx):
    session = Session.open(tiny_onnx)
    prompts = ["a", "Flat is better than nested.", "x y z"]  # 3 prompts on a batch-2 artifact
    together = session.generate(prompts, max_new_tokens=10)
    assert together == [session.generate(p, max_new_tokens=10) for p in prompts]


def test_concurrent_threads_are_serialised_not_mixed(tiny_onnx):
    session = Session.open(tiny_onnx)
    prompts = [f"prompt number {n}" for n in range(4)]
    expected = [session.generate(p, max_new_tokens=12) for p in prompts]
    got = [None] * len(prompts)

    def work(n):
        got[n] = session.generate(prompts[n], max_new_tokens=12)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_chat_prompt_starts_with_the_instruct_format(tiny_onnx):
    session = Session.open(tiny_onnx)
    ids = session.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == session.tokenizer.bos_id and session.decode(ids).startswith("[INST] Hi [/INST]")
    assert isinstance(session.generate("Hi", chat=True, max_new_tokens=5), str)


def test_system_prompt_opens_the_chat(tiny_onnx):
    session = Session.open(tiny_onnx)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = session.encode_chat(messages)
    assert session.decode(ids) == "[INST] Be brief.\n\nHi [/INST]"  # v1: in the first user turn
    assert session.generate("Hi", system="Be brief.", max_new_tokens=3) == session.generate_ids(
        [ids], max_new_tokens=3).completions[0].text


def test_ort_session_serves_without_importing_torch(tiny_onnx):
    code = ("import sys; from mixtral_export.runtimes.session import Session; "
            f"s = Session.open({str(tiny_onnx)!r}); s.generate('hello', max_new_tokens=4); "
            "bad = [m for m in ('torch', 'mixtral_export.model', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
