"""`serve --ray`'s lifecycle: start (or join) a Ray cluster, run the app on it, stop it and leave nothing.

A cluster started here is private to this process: its servers listen on loopback when `--host` is
loopback, it authenticates with a token held only in its processes' environment (no ~/.ray/auth_token
written), its session files live in a temporary folder, and on SIGINT/SIGTERM, also one that lands
while Ray is starting, every process it started is stopped and the folder removed. Ray binds its own
servers either to loopback or to every interface; docs/serving.md lists what it does not let us bind.

This module imports Ray only inside `serve_on_ray`, after the environment Ray reads at import is set.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from mixtral_export.errors import UserError

# Ray reads these when it is imported (driver and each process it starts). With clusters "disabled", Ray
# takes loopback as the node address instead of the machine's external one, so its servers bind loopback.
LOCAL_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class RayExposureError(UserError):
    """Ray chose a node address other than the loopback `--host` asked for."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cluster_environment(host: str, environ: dict[str, str]) -> dict[str, str]:
    """The variables a cluster started here adds to `environ`: loopback-only when `host` is loopback, and a
    fresh token of its own unless the user chose Ray's authentication already."""
    added = {}
    if is_loopback(host):
        added[LOCAL_ONLY_VARIABLE] = "0"
    if not any(name in environ for name in AUTH_VARIABLES):
        added["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return added


def _stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, start time) of a running process, from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # "pid (name) state ppid ..."
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every process below `pid` (children, their children, ...) -> its start time, so that a pid a new
    process took later is told apart; {} without /proc."""
    stats = {int(entry.name): _stat(entry.name) for entry in Path("/proc").glob("[0-9]*")}
    found, frontier = {}, {pid}
    while frontier:
        frontier = {child for child, stat in stats.items() if stat and stat[0] in frontier}
        found.update({child: stats[child][1] for child in frontier})
    return found


def kill_left(processes: dict[int, int]) -> None:
    """SIGKILL those of `processes` (pid -> start time) that still run as the same process."""
    for pid, start in processes.items():
        if (stat := _stat(pid)) is not None and stat[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone meanwhile
                pass


def serve_on_ray(artifact: str | Path, replicas: int, host: str, port: int, dashboard: bool = False,
                 **options) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, run the app until SIGINT/SIGTERM, shut it down.

    A signal during start-up ends it at the next step (Ray's own SIGTERM handler during `ray.init` ends
    `ray.init`): the cluster is stopped either way, then any process it left is killed by pid."""
    address = os.environ.get("RAY_ADDRESS")
    stop = threading.Event()

    def request_stop(*_):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    if not address:
        os.environ.update(cluster_environment(host, dict(os.environ)))  # before Ray is imported: it reads them then
    import ray
    from ray import serve

    from mixtral_export.serving.ray_app import deployment

    local = {}
    if not address:
        local = {"_node_ip_address": host, "_temp_dir": tempfile.mkdtemp(prefix="mixtral-ray-")}
        if host in ("0.0.0.0", "::", ""):  # every interface: Ray picks the node address itself
            del local["_node_ip_address"]
    started = {}  # the processes below this one once the cluster is up: killed if Ray leaves any
    try:
        try:
            # Replicas import mixtral_export from the installed package: a cluster's nodes install it as the driver did.
            ray.init(address=address, include_dashboard=dashboard, dashboard_host=host, logging_level="warning",
                     log_to_driver=False, **local)
        except SystemExit:  # Ray's SIGTERM handler, installed for the span of ray.init, stopped it
            stop.set()
        finally:
            signal.signal(signal.SIGTERM, request_stop)  # ray.init put its own in place
        if local and is_loopback(host) and not stop.is_set():
            chosen = ray.util.get_node_ip_address()
            if not is_loopback(chosen):
                raise RayExposureError(f"Ray took {chosen} as its node address, not loopback ({host}): its servers "
                                       f"would listen on every interface; import ray only after {LOCAL_ONLY_VARIABLE}=0")
        started = descendants(os.getpid())
        if not stop.is_set():
            serve.start(http_options={"host": host, "port": port})
        if not stop.is_set():
            serve.run(deployment(str(artifact), replicas=replicas, **options), name="mixtral-export", route_prefix="/")
        if not stop.is_set():
            print(f"serving {Path(artifact).name} on Ray Serve, {replicas} replicas, on http://{host}:{port}/v1",
                  flush=True)
            stop.wait()
        if ray.is_initialized():
            serve.shutdown()
    finally:
        started |= descendants(os.getpid())
        ray.shutdown()
        kill_left(started)
        if local:
            shutil.rmtree(local["_temp_dir"], ignore_errors=True)
