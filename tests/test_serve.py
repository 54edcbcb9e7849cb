"""The OpenAI-compatible server, as a real process on 127.0.0.1, driven by the official openai client."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[1]
# Serves like `mixtral-export serve`, then prints which heavy modules the server process imported.
WRAPPER = ("import sys; from mixtral_export.serving.server import serve; "
           "serve(sys.argv[1], port=int(sys.argv[2]), threads=1, model_name='tiny', grace=float(sys.argv[3])); "
           "print('IMPORTED', sorted(m for m in ('torch', 'transformers', 'mixtral_export.model') if m in sys.modules))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Server:
    def __init__(self, artifact: Path, *flags: str, grace: float | None = None, env: dict | None = None):
        """`mixtral-export serve` with flags, or (grace given) WRAPPER; env: variables added to the process's."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = ["-m", "mixtral_export", "serve", str(artifact), "--port", str(self.port), "--threads", "1",
                   "--model-name", "tiny", *flags] if grace is None else ["-c", WRAPPER, str(artifact),
                                                                         str(self.port), str(grace)]
        self.process = subprocess.Popen(
            [sys.executable, *command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180  # Ray Serve takes ~30 s to come up on a busy machine
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if get(self.url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            self.stop()
            pytest.fail("the server did not come up in 180 s")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        text = get(self.url + "/metrics")[1]
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def stop(self, sig=signal.SIGTERM, timeout=30) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        return self.process.returncode, output


@pytest.fixture(scope="module")
def server(tiny_onnx):
    running = Server(tiny_onnx, "--max-queue", "1")
    yield running
    code, output = running.stop()
    assert code == 0, output


@pytest.fixture(scope="module")
def session(tiny_onnx):
    from mixtral_export.runtimes.session import Session

    session = Session.open(tiny_onnx)
    yield session
    session.close()


def test_completion_equals_the_session_and_fills_usage(server, session):
    reply = server.client.completions.create(model="tiny", prompt="Simple is better", max_tokens=12, temperature=0)
    expected = session.generate_ids([session.encode("Simple is better")], max_new_tokens=12).completions[0]
    assert reply.choices[0].text == expected.text and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(expected.prompt_ids) and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert [m.id for m in server.client.models.list().data] == ["tiny"]


def test_chat_uses_the_generate_chat_encoding(server, session):
    messages = [{"role": "user", "content": "Hi there"}]
    reply = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    expected = session.generate_ids([session.encode_chat(messages)], max_new_tokens=8).completions[0]
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(session.encode_chat(messages))


def test_streamed_deltas_build_the_unstreamed_text(server):
    args = dict(model="tiny", prompt="Flat is better than", max_tokens=16, temperature=0, stop=["ne"])
    whole = server.client.completions.create(**args)
    pieces, finish = [], None
    for part in server.client.completions.create(stream=True, **args):
        pieces.append(part.choices[0].text)
        finish = part.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].text and finish == whole.choices[0].finish_reason
    chat = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
    parts = list(chat)
    assert parts[-1].usage.completion_tokens == 6 and parts[-2].choices[0].finish_reason == "length"


def test_stop_cuts_the_text_before_the_stop_string_streamed_or_not(server, session):
    prompt, max_tokens = "Beautiful is better than", 24
    full = session.generate_ids([session.encode(prompt)], max_new_tokens=max_tokens).completions[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # from the middle of the uncut text
    cut = full[:full.index(stop)]
    assert stop and cut and cut != full  # the request below would fail with the stop dropped
    args = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stop=[stop])
    whole = server.client.completions.create(**args)
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    pieces, finish = [], None
    for part in server.client.completions.create(stream=True, **args):
        pieces.append(part.choices[0].text)
        finish = part.choices[0].finish_reason or finish
    assert "".join(pieces) == cut and finish == "stop"


def test_a_stream_interval_sends_fewer_chunks_of_the_same_text(server, tiny_onnx):
    """--stream-interval 4: the first token at once, then a chunk per 4 tokens; the same text and usage."""
    args = dict(model="tiny", prompt="Readability counts", max_tokens=17, temperature=0,
                stream_options={"include_usage": True})
    every = [p for p in server.client.completions.create(stream=True, **args)]
    grouped = Server(tiny_onnx, "--stream-interval", "4")
    try:
        fewer = [p for p in grouped.client.completions.create(stream=True, **args)]
    finally:
        assert grouped.stop()[0] == 0
    text = lambda parts: "".join(p.choices[0].text for p in parts if p.choices)
    chunks = lambda parts: sum(bool(p.choices and p.choices[0].text) for p in parts)
    assert text(fewer) == text(every) and fewer[-1].usage.completion_tokens == 17
    assert 1 <= chunks(fewer) <= min(chunks(every), 1 + 4 + 1)  # first token, 16 more in 4s, what was held


def test_the_grouper_lets_out_the_first_token_then_every_interval():
    from mixtral_export.serving.openai_api import Grouper

    grouper = Grouper(3)
    sent = [grouper.add(text, tokens) for text, tokens in
            [("a", 1), ("", 1), ("b", 1), ("c", 1), ("d", 1), ("ef", 2), ("g", 1), ("h", 1)]]
    assert sent == ["a", "", "", "bc", "", "def", "", ""] and grouper.rest() == "gh"
    assert grouper.add("i", 1) == "" and grouper.rest() == "i"  # the end sends what was held
    assert [Grouper(1).add(t, 1) for t in "xyz"] == ["x", "y", "z"]  # interval 1: every token as it comes


def test_logprobs_are_the_sessions_streamed_or_not(server, session):
    """Chat: each token's logprob and its top_logprobs as the Session reports them (tests/test_logprobs.py
    compares those with transformers); the stream's logprobs are the whole reply's, token by token."""
    messages = [{"role": "user", "content": "Hi there"}]
    args = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    expected = session.generate_ids([session.encode_chat(messages)], max_new_tokens=8, logprobs=3).completions[0]
    content = server.client.chat.completions.create(**args).choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == 8
    for item, entry in zip(content, expected.logprobs):
        assert abs(item.logprob - entry.logprob) < 1e-6 and len(item.top_logprobs) == 3
        assert [abs(a.logprob - p) < 1e-6 for a, (_, p) in zip(item.top_logprobs, entry.top)] == [True] * 3
        raw = [int(item.token[len("bytes:\\x"):], 16)] if item.token.startswith("bytes:") else list(item.token.encode())
        assert item.bytes == raw  # a byte piece that is no character alone: "bytes:\\x9b" and its byte
    streamed = [c for part in server.client.chat.completions.create(stream=True, **args)
                if part.choices and part.choices[0].logprobs for c in part.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    text = server.client.completions.create(model="tiny", prompt="Simple is better", max_tokens=6, temperature=0,
                                            logprobs=2).choices[0]
    expected = session.generate_ids([session.encode("Simple is better")], max_new_tokens=6, logprobs=2).completions[0]
    assert np.allclose(text.logprobs.token_logprobs, [e.logprob for e in expected.logprobs], atol=1e-6)
    assert all(2 <= len(top) <= 3 and top[token] == p for top, token, p in  # the 2 best and the sampled one
               zip(text.logprobs.top_logprobs, text.logprobs.tokens, text.logprobs.token_logprobs))
    assert text.logprobs.text_offset[0] == 0 and text.logprobs.text_offset == sorted(text.logprobs.text_offset)


def test_seeded_sampling_is_reproducible(server):
    args = dict(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, top_p=0.9)
    texts = [server.client.completions.create(seed=seed, **args).choices[0].text for seed in (3, 3, 4)]
    assert texts[0] == texts[1] != texts[2]


def test_n_choices_are_reproducible_with_a_seed_and_all_counted(server):
    """n = 3 (batch 2, so one choice waits for a row): three choices, each reproducible with the seed,
    choice 0 the n = 1 reply; usage counts the prompt once and every choice's tokens."""
    messages = [{"role": "user", "content": "Once upon a time"}]
    args = dict(model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=7)
    replies = [server.client.chat.completions.create(n=3, logprobs=True, **args) for _ in range(2)]
    texts = [[c.message.content for c in r.choices] for r in replies]
    assert [c.index for c in replies[0].choices] == [0, 1, 2] and texts[0] == texts[1]
    assert len(set(texts[0])) > 1  # each choice its own draws
    alone = server.client.chat.completions.create(**args)
    assert alone.choices[0].message.content == texts[0][0]
    assert replies[0].usage.prompt_tokens == alone.usage.prompt_tokens
    assert replies[0].usage.completion_tokens == sum(len(c.logprobs.content) for c in replies[0].choices)


def test_logit_bias_forces_a_token_and_penalties_reach_the_sampler(server, session):
    """+100 on one token: every token is it, greedy or sampled. Penalties: the reply is the Session's
    with the same penalties (tests/test_sampling.py checks their arithmetic), not the plain one (negative
    penalties: the greedy reply of random weights rarely repeats a token by itself)."""
    forced = session.encode("ok")[-1]
    for temperature in (0, 1.0):
        reply = server.client.completions.create(model="tiny", prompt="Simple is better", max_tokens=5,
                                                 temperature=temperature, logit_bias={str(forced): 100})
        assert reply.choices[0].text == session.decode([forced] * 5) and reply.usage.completion_tokens == 5
    prompt, penalties = session.encode("Beautiful is better than"), dict(frequency_penalty=-2.0, presence_penalty=-1.5)
    plain = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    penalized = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, **penalties)
    expected = session.generate_ids([prompt], max_new_tokens=24, **penalties).completions[0].text
    assert penalized.choices[0].text == expected != plain.choices[0].text


@pytest.mark.parametrize("body, param", [
    (dict(prompt="x", temperature=3), "temperature"), (dict(prompt="x", max_tokens=0), "max_tokens"),
    (dict(prompt=[]), "prompt"), (dict(prompt="x", stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(prompt="x", logprobs=6), "logprobs"), (dict(prompt="x", logit_bias={"1": 101}), "logit_bias"),
    (dict(prompt="x", logit_bias={"100000": 1}), "logit_bias"), (dict(prompt="x", presence_penalty=-2.5), "presence_penalty"),
    (dict(prompt="x", n=2, stream=True), "n"), (dict(prompt=[10**6]), "prompt"), (dict(prompt="x " * 2000), "prompt")])
def test_bad_requests_get_400_with_an_openai_error_body(server, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.completions.create(model="tiny", **body)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error" and error["message"]
    assert param is None or error["param"] == param


def test_tools_and_unknown_fields_are_refused_not_ignored(server):
    messages = [{"role": "user", "content": "Hi"}]
    for extra in (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
                  dict(extra_body={"guided_json": {"type": "object"}})):
        with pytest.raises(openai.BadRequestError) as caught:
            server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **extra)
        name = next(iter(extra.get("extra_body", extra)))
        assert caught.value.status_code == 400 and caught.value.body["param"] == name
        assert f"'{name}'" in caught.value.body["message"]


def test_unknown_model_and_bad_json(server):
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-4", prompt="x")
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400 and "error" in json.loads(caught.value.read())
    with pytest.raises(openai.BadRequestError, match="message 0"):
        server.client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "x"}])


def test_a_full_queue_gets_429_at_once(server):
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:  # 2 rows + 1 queued < 4 prompts
        server.client.completions.create(model="tiny", prompt=["a", "b", "c", "d"], max_tokens=500, temperature=0)
    assert caught.value.status_code == 429 and time.monotonic() - started < 10
    wait_idle(server)
    assert server.metric('mixtral_requests_total{outcome="rejected_queue_full"}') >= 1


def wait_idle(server, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = json.loads(get(server.url + "/health")[1])
        if health["busy_rows"] == 0 and health["queue_depth"] == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"the server still holds requests after {seconds} s: {health}")


def test_a_client_disconnecting_mid_stream_frees_its_row(server):
    before = server.metric('mixtral_requests_total{outcome="disconnected"}')
    stream = server.client.completions.create(model="tiny", prompt="Long", max_tokens=1000, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # drops the connection mid-stream
    wait_idle(server)
    assert server.metric('mixtral_requests_total{outcome="disconnected"}') == before + 1
    reply = server.client.completions.create(model="tiny", prompt="still alive", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    text = get(server.url + "/metrics")[1]
    for name in ("mixtral_queue_depth", "mixtral_busy_rows", "mixtral_generated_tokens_total",
                 "mixtral_time_to_first_token_seconds_bucket", "mixtral_inter_token_latency_seconds_bucket"):
        assert name in text


def test_sigterm_finishes_requests_in_flight_and_exits_0(tiny_onnx):
    server = Server(tiny_onnx, grace=2)
    results: dict[int, tuple[str, str | None]] = {}
    first_token = threading.Barrier(3, timeout=30)

    def work(n):
        text, finish = "", None
        stream = server.client.completions.create(model="tiny", prompt=f"request {n}", max_tokens=40 if n else 1000,
                                                  temperature=0, stream=True)
        for count, part in enumerate(stream):
            if count == 0:
                first_token.wait()
            text += part.choices[0].text
            finish = part.choices[0].finish_reason or finish
        results[n] = (text, finish)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    first_token.wait()
    code, output = server.stop(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert code == 0, output
    assert "IMPORTED []" in output, output  # the ORT server never imported torch
    assert results[1][1] == "length"  # 40 tokens: finished within the grace period
    assert results[0][1] == "length"  # 1000 tokens: cut at the grace period, but the stream ended properly


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_concurrent_streams_through_the_engine_process_equal_their_solo_runs(server, session):
    """Tokens cross from the engine process once per step for all rows: every stream still gets its own."""
    prompts = [session.encode(text) for text in ("A", "Beautiful is better than ugly", "Errors should never",
                                                 "pass silently. Unless explicitly silenced", "Now", "is better")]
    lengths = [5, 17, 9, 3, 12, 7]
    solo = [session.generate_ids([p], max_new_tokens=n).completions[0].text for p, n in zip(prompts, lengths)]
    got: dict[int, str] = {}

    def work(n):
        for _ in range(20):  # the fixture's queue holds 1: retry a 429
            try:
                parts = server.client.completions.create(model="tiny", prompt=prompts[n], max_tokens=lengths[n],
                                                         temperature=0, stream=True)
                got[n] = "".join(p.choices[0].text for p in parts)
                return
            except openai.RateLimitError:
                time.sleep(0.05)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got.get(n) for n in range(len(prompts))] == solo


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_the_engine_runs_in_a_torch_free_process_of_its_own_and_its_loss_is_an_error_not_a_hang(tiny_onnx):
    server = Server(tiny_onnx)
    try:
        (engine,) = children(server.process.pid)
        for pid in (server.process.pid, engine):
            assert "torch" not in Path(f"/proc/{pid}/maps").read_text(), pid
        stream = server.client.completions.create(model="tiny", prompt="x", max_tokens=1000, temperature=0,
                                                  stream=True)
        next(iter(stream))
        os.kill(engine, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="the engine process exited"):  # in-band, no hang
            list(stream)
        assert get(server.url + "/health")[0] == 503
    finally:
        code, output = server.stop()
    assert code == 0, output


@pytest.mark.slow
def test_load_bench_runs_and_writes_json(tiny_onnx, tmp_path):
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, "bench/serve_load.py", str(tiny_onnx), "--clients", "1,2", "--requests", "4",
                          "--rounds", "2", "--threads", "1", "--json", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert [level["clients"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["mismatches"] == 0 and level["speedup"] > 0
        assert all(level[mode]["failures"] == 0 and level[mode]["generated_tokens"] > 0
                   for mode in ("continuous", "serialized"))
