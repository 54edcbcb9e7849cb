"""A stage hop on Ray two ways: object-store actor calls (what runtimes/ray_stages.py does) against
Ray's compiled graphs (shared-memory channels between actors, `experimental_compile`).

    python3 -m mixtral_export.bench.ray_channels --stages 1,2,4 --batch 1,4 --rounds 5 --steps 50

Each stage is an actor whose `run` returns its input (B, 1, H) float32 plus one: no model, so a step
times the hops alone (driver -> stage 0 -> ... -> last -> driver), the part of a pipeline step that
the transport decides. H is Mixtral 8x7B's 4096, T = 1 (decode). Per stage count and batch, the two
transports run round by round interleaved (this machine is shared); a row prints each one's median
step over all rounds and compiled over object store. A local cluster, loopback only, as
runtimes/ray_stages.py starts it. Needs the `ray` extra; benchmarks only, never CI.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

HIDDEN = 4096  # Mixtral 8x7B's hidden size: the bytes a hop carries per row


class Stage:
    """A stand-in stage: its output is its input plus one, so every hop's result is checked."""

    def run(self, x: np.ndarray) -> np.ndarray:
        return x + 1


def object_store_step(actors, x: np.ndarray):
    import ray

    ref = x
    for actor in actors:
        ref = actor.run.remote(ref)  # the ObjectRef goes actor to actor; the driver waits for the last
    return ray.get(ref)


def compiled_graph(actors):
    from ray.dag import InputNode

    with InputNode() as source:
        node = source
        for actor in actors:
            node = actor.run.bind(node)
    return node.experimental_compile()


def measure(stages: int, batch: int, rounds: int, steps: int) -> dict[str, list[float]]:
    import ray

    actor_class = ray.remote(num_cpus=0)(Stage)
    plain = [actor_class.remote() for _ in range(stages)]
    channelled = [actor_class.remote() for _ in range(stages)]
    dag = compiled_graph(channelled)
    x = np.zeros((batch, 1, HIDDEN), np.float32)  # (B, T, H)
    runs = {"object store": lambda: object_store_step(plain, x), "compiled graph": lambda: ray.get(dag.execute(x))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up: actors started, channels allocated
        assert float(run()[0, 0, 0]) == stages
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(steps):
                start = time.perf_counter()
                out = run()
                times[name].append(time.perf_counter() - start)
            assert out.shape == x.shape and float(out[0, 0, 0]) == stages
    dag.teardown()
    for actor in plain + channelled:
        ray.kill(actor)
    return times


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="1,2,4")
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_CGRAPH_teardown_timeout", "1")  # the stand-in actors hold nothing to wait for
    os.environ.setdefault("RAY_CGRAPH_get_timeout", "120")  # a loaded machine starts the channels slowly
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning", _node_ip_address="127.0.0.1")
    print(f"load {os.getloadavg()[0]:.1f}; {args.rounds} rounds x {args.steps} steps per transport, interleaved")
    print("| stages | batch | object store (ms) | compiled graph (ms) | compiled / object store |")
    print("| --- | --- | --- | --- | --- |")
    for stages in map(int, args.stages.split(",")):
        for batch in map(int, args.batch.split(",")):
            times = measure(stages, batch, args.rounds, args.steps)
            plain, channelled = (statistics.median(times[k]) * 1e3 for k in ("object store", "compiled graph"))
            print(f"| {stages} | {batch} | {plain:.2f} | {channelled:.2f} | {channelled / plain:.2f}x |", flush=True)
    print(f"load {os.getloadavg()[0]:.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
