"""Scale-out on Ray Serve: a local Ray cluster, 2 replicas of the engine, requests landing on both."""
from __future__ import annotations

import json
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("openai")

from tests.test_serve import Server, session  # noqa: E402,F401  (session: a fixture)


@pytest.mark.slow
def test_two_replicas_both_serve_requests(tiny_onnx, session):
    server = Server(tiny_onnx, "--ray", "--replicas", "2")
    try:
        def complete(n):
            body = json.dumps({"model": "tiny", "prompt": "Simple is better", "max_tokens": 32, "temperature": 0})
            request = urllib.request.Request(server.url + "/v1/completions", data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.headers["x-replica"], json.loads(reply.read())["choices"][0]["text"]

        answers = []
        with ThreadPoolExecutor(16) as pool:
            for _ in range(3):  # Ray's router picks replicas at random among the least busy: rarely one takes all
                answers += pool.map(complete, range(32))
                if len({replica for replica, _ in answers}) == 2:
                    break
        expected = session.generate_ids([session.encode("Simple is better")], max_new_tokens=32).completions[0].text
        assert len({replica for replica, _ in answers}) == 2  # both replicas served
        assert {text for _, text in answers} == {expected}  # and both answer like the Session
    finally:
        code, output = server.stop(signal.SIGTERM, timeout=90)
    assert code == 0, output


@pytest.mark.slow
def test_a_replica_runs_its_own_pipeline_of_stage_actors(tiny_checkpoint, tiny_onnx, tmp_path):
    """serve --ray --stage-actors over a staged artifact: the replica's engine drives stage actors of its
    own (two groups of rows in flight) and answers as the whole artifact."""
    from mixtral_export.graphs.onnx_export import export_onnx
    from tests.test_pipeline import assert_serves_as_the_whole

    art = export_onnx(tiny_checkpoint, tmp_path / "art", dtype="float32", batch=2, prefill_chunk=8, cache_slots=32,
                      stages=2)
    server = Server(art, "--ray", "--replicas", "1", "--stage-actors", "--row-groups", "2")
    try:
        titles = [title for title in descendant_titles(server.process.pid) if "StageActor" in title]
    except BaseException:
        server.stop(signal.SIGTERM, timeout=90)
        raise
    assert_serves_as_the_whole(server, tiny_onnx, ("Simple is better", "Flat is better than nested"))
    assert len(titles) == 2, titles  # the replica's own stage actors, below this server's Ray cluster


def descendant_titles(pid: int) -> list[str]:
    """The command lines (Ray's process titles) of every process below `pid`."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    below, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - below
        below |= frontier
    titles = []
    for child in below:
        try:
            titles.append((Path("/proc") / str(child) / "cmdline").read_text().replace("\0", " "))
        except OSError:
            continue
    return titles
