"""Load benchmark of `mixtral-export serve`: C concurrent HTTP clients, continuous batching against serialized.

Two server processes over the same artifact: the engine on every batch row, and the serialized
baseline (`--rows 1`: one request at a time, what a Session did before the engine). For each
client count C, N requests with mixed prompt and output lengths (greedy, token-id prompts, the same
list for both) go through each server, the two interleaved and alternating who goes first each
round. Reported per C and server: aggregate generated tok/s (completion tokens / wall time, pooled
over rounds), the speedup as the median of per-round ratios (the two runs of a round share the
machine's load, which on a shared machine moves more than the speedup), time to first token and
inter-token latency p50 / p99 (streamed chunks), failures, and how many continuous-batching
completions differ from the serialized (= solo) run of the same request, and the CPU time per
generated token of each server's HTTP front and engine process (from /proc: load-independent
where wall-clock rates are not). The clients are lean, since they run on the servers' cores: C
keep-alive connections on one uvloop event loop in this process, raw HTTP/1.1, each reply kept as
bytes with its arrival times and parsed after the round's clock stops. `--stream-interval N`
starts both servers with it (a chunk per N tokens after the first: inter-token latency is then per
chunk); `--in-process` runs both with the engine on a thread of the HTTP process; `--lock FILE`
holds a flock on FILE for each round only.

    python3 -m mixtral_export.bench.serve_load out/tiny-b4 --clients 1,2,4,8,16 --requests 32 --rounds 6 --threads 1 --json out/serve.json --plot out/serve.png
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import fcntl
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("continuous", "serialized")


@dataclass
class Outcome:
    ok: bool
    tokens: int = 0
    text: str = ""
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str = ""


class ServerProcess:
    def __init__(self, artifact: Path, rows: int | None, threads: int | None, stream_interval: int = 1,
                 in_process: bool = False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, "-m", "mixtral_export", "serve", str(artifact), "--port", str(self.port),
                   "--max-queue", "100000", "--model-name", "bench"]
        command += ["--rows", str(rows)] if rows else []
        command += ["--threads", str(threads)] if threads else []
        command += ["--stream-interval", str(stream_interval)] + (["--in-process"] if in_process else [])
        self.process = subprocess.Popen(command,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {self.process.stderr.read()}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise SystemExit("the server did not come up")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time so far of the HTTP front (this process) and the engine (its child, when out of process)."""
        ticks = os.sysconf("SC_CLK_TCK")

        def used(pid: int) -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return {"front": used(self.process.pid), "engine": sum(used(int(pid)) for pid in children)}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


class Connection(asyncio.Protocol):
    """One client's keep-alive HTTP/1.1 connection (as the openai client's pool keeps one): per
    exchange, the raw reply and when each piece of it arrived. Nothing is parsed while the load runs
    (`reply` does it after), so the clients' own CPU, on the cores the servers use, is a socket read,
    a timestamp and an end-of-reply check per chunk."""

    def __init__(self):
        self.transport, self.raw, self.arrivals, self.done, self.length = None, bytearray(), [], None, None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, request: bytes) -> asyncio.Future:
        self.raw, self.arrivals, self.length = bytearray(), [], None  # (seconds, bytes so far)
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.raw += data
        self.arrivals.append((time.perf_counter(), len(self.raw)))
        if self.length is None and (end := self.raw.find(b"\r\n\r\n")) >= 0:  # the head is in: how it ends
            head = bytes(self.raw[:end]).lower()
            self.length = -1 if b"transfer-encoding: chunked" in head else end + 4 + int(
                (head.split(b"content-length:", 1)[1:] or [b"0"])[0].split(b"\r\n")[0])
        if self.length is not None and (self.raw.endswith(b"\r\n0\r\n\r\n") if self.length < 0
                                        else len(self.raw) >= self.length):
            self.done.set_result(True)

    def connection_lost(self, error) -> None:
        self.transport = None
        if self.done is not None and not self.done.done():
            self.done.set_result(False)


async def exchange(port: int, connection: Connection, prompt: list[int], max_tokens: int) -> tuple[float, bytes, list]:
    """A streamed greedy completion on `connection` (reconnected if the server closed it): its start
    time, raw reply and arrivals, or an error string in place of the reply."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    started = time.perf_counter()
    try:
        if connection.transport is None:
            await asyncio.get_running_loop().create_connection(lambda: connection, "127.0.0.1", port)
        complete = await asyncio.wait_for(connection.send(head + body), 600)
        return started, bytes(connection.raw) if complete else "the server closed the connection", connection.arrivals
    except (OSError, asyncio.TimeoutError) as error:
        return started, f"{type(error).__name__}: {error}", []


def reply(started: float, raw: bytes | str, arrivals: list[tuple[float, int]]) -> Outcome:
    """Parse one finished exchange: HTTP status, chunked body, SSE events; time to first text chunk
    and gaps between text chunks from when the bytes that complete each one arrived."""
    if isinstance(raw, str):
        return Outcome(False, error=raw)
    head, separator, rest = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return Outcome(False, error=f"no HTTP reply: {raw[:200]!r}")
    if status != 200:
        return Outcome(False, error=f"HTTP {status}: {rest[:200]!r}")
    offset, payloads = len(head) + len(separator), []  # (payload, offset in raw where it ends)
    while True:  # Transfer-Encoding: chunked
        line_end = raw.find(b"\r\n", offset)
        size = int(raw[offset:line_end].split(b";")[0] or b"x", 16) if line_end >= 0 else -1
        if size < 0 or line_end + 2 + size > len(raw):
            return Outcome(False, error="the reply ended early")
        if size == 0:
            break
        payloads.append((raw[line_end + 2:line_end + 2 + size], line_end + 2 + size))
        offset = line_end + 4 + size
    received = [length for _, length in arrivals]
    outcome, last, pending = Outcome(True), None, b""
    for payload, ends_at in payloads:
        now = arrivals[bisect.bisect_left(received, ends_at)][0]
        *events, pending = (pending + payload).split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            chunk = json.loads(event[6:])
            if chunk.get("usage"):
                outcome.tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("error"):
                return Outcome(False, error=str(chunk["error"]))
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                if last is None:
                    outcome.ttft = now - started
                else:
                    outcome.gaps.append(now - last)
                last = now
                outcome.text += chunk["choices"][0]["text"]
    return outcome


def load(port: int, workload: list[tuple[list[int], int]], clients: int) -> tuple[list[Outcome], float]:
    """`clients` concurrent keep-alive connections on one event loop take the workload's requests in order until
    none is left; outcomes (parsed after the clock stops), wall seconds."""

    async def drive():
        done: list = [None] * len(workload)
        todo = iter(enumerate(workload))

        async def client():
            connection = Connection()
            for index, (prompt, max_tokens) in todo:
                done[index] = await exchange(port, connection, prompt, max_tokens)
            if connection.transport is not None:
                connection.transport.close()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done, time.perf_counter() - started

    try:
        import uvloop  # what the servers run on (the serve extra): a lighter loop than asyncio's
        done, seconds = uvloop.run(drive())
    except ImportError:
        done, seconds = asyncio.run(drive())
    return [reply(*d) for d in done], seconds


@contextlib.contextmanager
def measuring(lock: Path | None):
    """Hold `lock` (flock, shared with other measurements on the machine) for one round, if given."""
    if lock is None:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(outcomes: list[Outcome], seconds: float) -> dict:
    good = [o for o in outcomes if o.ok]
    gaps = [g for o in good for g in o.gaps]
    ttfts = [o.ttft for o in good if o.ttft is not None]
    tokens = sum(o.tokens for o in good)
    return {"requests": len(outcomes), "failures": len(outcomes) - len(good), "seconds": seconds,
            "generated_tokens": tokens, "tokens_per_second": tokens / seconds,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
            "errors": sorted({o.error for o in outcomes if not o.ok})[:5]}


def workload(count: int, vocab: int, prompt_lengths: tuple[int, int], output_lengths: tuple[int, int],
             seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_lengths))], rng.randint(*output_lengths))
            for _ in range(count)]


def run(args) -> dict:
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    batch, vocab = manifest["shapes"]["batch"], manifest["shapes"]["vocab_size"]
    servers = {"continuous": ServerProcess(args.artifact, None, args.threads, args.stream_interval, args.in_process),
               "serialized": ServerProcess(args.artifact, 1, args.threads, args.stream_interval, args.in_process)}
    levels = []
    try:
        for mode in MODES:  # warm both: first-call allocations out of the measurement
            load(servers[mode].port, workload(batch, vocab, (4, 8), (4, 8), 0), batch)
        for clients in args.clients:
            requests = workload(args.requests, vocab, args.prompt_lengths, args.output_lengths, args.seed + clients)
            pooled = {mode: ([], 0.0) for mode in MODES}
            cpu = {mode: {"front": 0.0, "engine": 0.0} for mode in MODES}  # CPU seconds while loaded
            ratios = []  # per round: the two servers measured back to back share the machine's load
            for round_ in range(args.rounds):
                rates = {}
                with measuring(args.lock):
                    for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
                        before = servers[mode].cpu_seconds()
                        outcomes, seconds = load(servers[mode].port, requests, clients)
                        after = servers[mode].cpu_seconds()
                        for part in after:
                            cpu[mode][part] += after[part] - before[part]
                        pooled[mode] = (pooled[mode][0] + outcomes, pooled[mode][1] + seconds)
                        rates[mode] = summarize(outcomes, seconds)["tokens_per_second"]
                        rates[mode + " load"] = os.getloadavg()[0]
                ratios.append(rates["continuous"] / rates["serialized"])
                print(f"C={clients} round {round_}: {rates['continuous']:.1f} / {rates['serialized']:.1f} tok/s "
                      f"= {ratios[-1]:.2f}x (load {rates['continuous load']:.1f} / {rates['serialized load']:.1f})",
                      file=sys.stderr, flush=True)
            level = {"clients": clients, **{mode: summarize(*pooled[mode]) for mode in MODES}}
            for mode in MODES:
                tokens = max(1, level[mode]["generated_tokens"])
                level[mode]["cpu_us_per_token"] = {part: seconds / tokens * 1e6 for part, seconds in cpu[mode].items()}
            cont, serial = pooled["continuous"][0], pooled["serialized"][0]
            level["mismatches"] = sum(a.ok and b.ok and a.text != b.text for a, b in zip(cont, serial))
            level["speedup"] = statistics.median(ratios)
            level["speedup_range"] = [min(ratios), max(ratios)]
            levels.append(level)
    finally:
        for server in servers.values():
            server.stop()
    return {"artifact": str(args.artifact), "batch": batch, "requests_per_level": args.requests,
            "rounds": args.rounds, "prompt_lengths": args.prompt_lengths, "output_lengths": args.output_lengths,
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "threads": args.threads,
            "stream_interval": args.stream_interval, "in_process": args.in_process, "levels": levels}


def table(result: dict) -> str:
    ms = lambda s: "-" if s is None else f"{s * 1e3:.0f}"
    lines = [f"artifact {result['artifact']} (batch {result['batch']}), {result['requests_per_level']} requests "
             f"x {result['rounds']} rounds per level, stream interval {result.get('stream_interval', 1)}; load average at the end "
             f"{' '.join(f'{x:.1f}' for x in result['load_average'])} on {result['cpus']} CPUs",
             "| clients | server | tok/s (pooled) | vs serialized: median (min-max) of rounds | TTFT p50 / p99 ms | ITL p50 / p99 ms | failures | "
             "differs from solo | CPU us/token front / engine |", "|---|---|---|---|---|---|---|---|---|"]
    for level in result["levels"]:
        for mode in MODES:
            m = level[mode]
            low, high = level["speedup_range"]
            ratio = f"{level['speedup']:.2f}x ({low:.2f}-{high:.2f})" if mode == "continuous" else "1.00x"
            differs = str(level["mismatches"]) if mode == "continuous" else "-"
            lines.append(f"| {level['clients']} | {mode} | {m['tokens_per_second']:.1f} | {ratio} | "
                         f"{ms(m['ttft_p50'])} / {ms(m['ttft_p99'])} | {ms(m['itl_p50'])} / {ms(m['itl_p99'])} | "
                         f"{m['failures']} | {differs} | {m['cpu_us_per_token']['front']:.0f} / "
                         f"{m['cpu_us_per_token']['engine']:.0f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [level["clients"] for level in result["levels"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        left.plot(clients, [level[mode]["tokens_per_second"] for level in result["levels"]], "o-", label=mode)
        right.plot(clients, [level[mode]["ttft_p50"] * 1e3 for level in result["levels"]], "o-", label=mode)
    left.set(xlabel="concurrent clients", ylabel="generated tok/s (aggregate)", xscale="log", xticks=clients)
    right.set(xlabel="concurrent clients", ylabel="TTFT p50 (ms)", xscale="log", yscale="log", xticks=clients)
    for axis in (left, right):
        axis.set_xticklabels([str(c) for c in clients])
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(f"mixtral-export serve: {Path(result['artifact']).name}, batch {result['batch']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def pair(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="ONNX artifact folder (export it with --batch >= 4)")
    parser.add_argument("--clients", default="1,2,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests", type=int, default=48, help="requests per client count and server")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per client count, pooled")
    parser.add_argument("--prompt-lengths", type=pair, default=(4, 48), help="min,max prompt tokens")
    parser.add_argument("--output-lengths", type=pair, default=(8, 64), help="min,max max_tokens")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="both servers' --stream-interval (tokens per SSE chunk; ITL is then per chunk)")
    parser.add_argument("--in-process", action="store_true",
                        help="both servers step their engine on a thread of the HTTP process (serve --in-process)")
    parser.add_argument("--lock", type=Path, default=None,
                        help="a file to flock around each round (servers start and warm up outside it)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG (needs matplotlib)")
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError:
            print("no matplotlib: PNG skipped (pip install 'mixtral-export[plot]')", file=sys.stderr)


if __name__ == "__main__":
    main()
