"""Scale-out on Ray Serve: N replicas, each one Session (one engine over its own backend), same routes.

Ray's HTTP proxy spreads requests over the replicas; each answers with the app of serving/app.py,
so the OpenAI routes, errors, SSE and /metrics are the same as `mixtral-export serve` (metrics are
per replica: scrape each, or read the `x-replica` header a response carries). Either

    mixtral-export serve ART --ray --replicas 2 [--port 8000]      # starts or joins a Ray cluster (ray_cluster.py)
    serve run mixtral_export.serving.ray_app:app artifact=ART replicas=2           # Ray's own CLI

On a multi-machine cluster (`ray start --head` on one machine, `ray start --address=HEAD:6379` on
the others, the artifact at the same path on each), give each replica a machine's CPUs
(`--threads`, reserved as num_cpus) or a GPU (`--provider cuda`, num_gpus=1).

Over a staged artifact with `--stage-actors` each replica is its own pipeline: its engine in the
replica, each stage in a Ray actor of its own (runtimes/ray_stages.py, `--stage-options` their
placement, `--row-groups` its groups in flight); the replica then reserves one CPU for its engine.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from ray import serve

from mixtral_export.serving.app import build_app
from mixtral_export.serving.guards import API_KEY_VARIABLE


@serve.deployment
@serve.ingress()
class Replica:
    """One engine per replica; the ASGI app is built on the replica, after the artifact is open."""

    def __init__(self, artifact: str, runtime: str = "ort", provider: str = "cpu", max_queue: int = 64,
                 model_name: str | None = None, threads: int | None = None, request_timeout: float | None = None,
                 api_key: str | None = None, stage_actors: bool = False, row_groups: int = 1,
                 stage_options: list | dict | None = None):
        from mixtral_export.runtimes.session import Session

        self.session = Session.open(artifact, runtime=runtime, provider=provider, threads=threads,
                                    max_queue=max_queue, ray=stage_actors, row_groups=row_groups,
                                    stage_options=stage_options)
        self.name = model_name or Path(artifact).resolve().name
        self.request_timeout, self.api_key = request_timeout, api_key

    def __serve_build_asgi_app__(self):
        return build_app(self.session.client, self.session.tokenizer, self.session.manifest.eos_token_id, self.name,
                         request_timeout=self.request_timeout, replica=f"{socket.gethostname()}:{os.getpid()}",
                         api_key=self.api_key)

    def __del__(self):
        self.session.close()


def deployment(artifact: str, replicas: int = 1, runtime: str = "ort", provider: str = "cpu", max_queue: int = 64,
               model_name: str | None = None, threads: int | None = None, request_timeout: float | None = None,
               api_key: str | None = None, stage_actors: bool = False, row_groups: int = 1,
               stage_options: list | dict | None = None):
    """The bound application: `replicas` copies of Replica, each reserving its threads (or a GPU; with
    stage actors one CPU: the stages reserve their own)."""
    actor = ({"num_cpus": 1} if stage_actors else {"num_gpus": 1} if provider == "cuda" else
             {"num_cpus": threads or 1})
    return Replica.options(num_replicas=replicas, ray_actor_options=actor).bind(
        str(Path(artifact).resolve()), runtime, provider, max_queue, model_name, threads, request_timeout, api_key,
        stage_actors, row_groups, stage_options)


def app(args: dict):
    """`serve run mixtral_export.serving.ray_app:app artifact=ART replicas=N [max_queue=..] [threads=..]`."""
    return deployment(args["artifact"], replicas=int(args.get("replicas", 1)), runtime=args.get("runtime", "ort"),
                      provider=args.get("provider", "cpu"), max_queue=int(args.get("max_queue", 64)),
                      model_name=args.get("model_name"),
                      threads=int(args["threads"]) if args.get("threads") else None,
                      api_key=args.get("api_key") or os.environ.get(API_KEY_VARIABLE))

