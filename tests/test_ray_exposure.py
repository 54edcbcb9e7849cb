"""`serve --ray --host 127.0.0.1`: every server of the cluster it starts listens on loopback (but the one
Ray Serve hard-codes, docs/serving.md), and SIGTERM or SIGINT, also during start-up, leaves no process or file."""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mixtral_export.serving.ray_cluster import cluster_environment, descendants, is_loopback

# Ray Serve's replica starts its inter-deployment gRPC server on "[::]:0", with no setting to change it.
WILDCARD_ALLOWED = "ray::ServeReplica"


def command_line(pid: int) -> str:
    """The process's command line ("" once it is gone); Ray names its workers there (ray::ProxyActor)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def proc_address(hexed: str) -> str:
    """/proc/net/tcp{,6}'s "0100007F:1F90" -> "127.0.0.1": 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hexed.split(":")[0])
    return str(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))


def listening_from_proc(pids) -> list[tuple[int, str, str]]:
    """(pid, command line, address) of every listening TCP socket the processes hold: their /proc/PID/fd
    socket inodes looked up in /proc/net/tcp and tcp6."""
    sockets = {}  # inode -> local address, of listening sockets (state 0A)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                sockets[fields[9]] = proc_address(fields[1])
    def link(fd: Path) -> str:
        try:
            return os.readlink(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor, for one)
            return ""

    found = []
    for pid in pids:
        try:
            links = [link(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone meanwhile
            continue
        found += [(pid, command_line(pid), sockets[name[8:-1]]) for name in links
                  if name.startswith("socket:[") and name[8:-1] in sockets]
    return found


def listening(pids) -> list[tuple[int, str, str]]:
    """listening_from_proc's answer, from psutil where it is present."""
    try:
        import psutil
    except ImportError:
        return listening_from_proc(pids)
    found = []
    for pid in pids:
        try:
            found += [(pid, command_line(pid), c.laddr.ip) for c in psutil.Process(pid).net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN]
        except (psutil.Error, OSError):  # gone meanwhile
            pass
    return found


def on_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def still_running(processes: dict[int, int]) -> list[str]:
    """Those of `processes` (pid -> start time) that run still, as the same process."""
    left = []
    for pid, start in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[19]) == start and fields[0] != "Z":
            left.append(f"{pid} {command_line(pid)}")
    return left


def test_cluster_environment_binds_loopback_and_keeps_the_users_auth():
    assert set(cluster_environment("127.0.0.1", {})) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_TOKEN"}
    assert cluster_environment("localhost", {})["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert set(cluster_environment("10.1.2.3", {})) == {"RAY_AUTH_TOKEN"}  # Ray then binds every interface
    assert cluster_environment("::1", {"RAY_AUTH_MODE": "disabled"}) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    first, second = (cluster_environment("127.0.0.1", {})["RAY_AUTH_TOKEN"] for _ in range(2))
    assert first != second and len(first) == 64  # a fresh 256-bit token per cluster
    assert [is_loopback(h) for h in ("127.0.0.2", "::1", "0.0.0.0", "::", "example.org")] == [True, True] + [False] * 3


def test_descendants_finds_grandchildren():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                              "subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"])
    try:
        deadline = time.monotonic() + 20
        while len(found := descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in found and len([pid for pid in found if pid != child.pid]) >= 1
    finally:
        for pid in descendants(child.pid):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()


def test_listening_sockets_are_read_from_proc():
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6:
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::", 0))
        v4.listen()
        v6.listen()
        mine = {(address, pid) for pid, _, address in listening_from_proc([os.getpid()])}
        assert {("127.0.0.1", os.getpid()), ("::", os.getpid())} <= mine
        assert [on_loopback(a) for a in ("127.0.0.1", "::ffff:127.0.0.1", "::1", "::", "0.0.0.0", "192.0.2.2")] \
            == [True, True, True, False, False, False]


@pytest.fixture
def private_dirs():
    """A TMPDIR and a HOME of the server's own, to see every file Ray leaves in either. Short paths (not
    tmp_path): Ray's Unix sockets live in the session folder, and their paths may not pass 107 bytes."""
    top = Path(tempfile.mkdtemp(prefix="mx-"))
    (top / "tmp").mkdir()
    (top / "home").mkdir()
    yield {"TMPDIR": str(top / "tmp"), "HOME": str(top / "home")}
    shutil.rmtree(top, ignore_errors=True)


def assert_nothing_left(processes: dict[int, int], dirs: dict[str, str]):
    deadline = time.monotonic() + 10  # processes killed at exit take a moment to be reaped
    while (left := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    # The session folder is gone; ".ses" is ONNX Runtime's (any InferenceSession writes it to TMPDIR), not Ray's.
    assert [path.name for path in Path(dirs["TMPDIR"]).iterdir() if path.name != ".ses"] == []
    assert not (Path(dirs["HOME"]) / ".ray").exists()  # no auth token written


@pytest.mark.slow
def test_ray_listens_only_on_host_and_sigterm_leaves_nothing(tiny_onnx, private_dirs):
    pytest.importorskip("ray.serve")
    from tests.test_serve import Server

    server = Server(tiny_onnx, "--ray", "--host", "127.0.0.1", env=private_dirs)
    try:
        processes = descendants(server.process.pid)
        sockets = listening([server.process.pid, *processes])
        exposed = [(pid, line, address) for pid, line, address in sockets if not on_loopback(address)]
        commands = " ".join(line for _, line, _ in sockets)
        assert "gcs_server" in commands and "raylet" in commands and "ProxyActor" in commands  # all were seen
        assert all(line.startswith(WILDCARD_ALLOWED) and address in ("::", "0.0.0.0")
                   for _, line, address in exposed), exposed
        assert len(exposed) <= 1, exposed  # one replica: its one inter-deployment server at most
    finally:
        code, output = server.stop(signal.SIGTERM, timeout=90)
    assert code == 0, output
    assert_nothing_left(processes, private_dirs)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_ray_starts_leaves_nothing(tiny_onnx, private_dirs, sig):
    """Ray's raylet is up, ray.init has not returned: the signal stops it all, exit 0, nothing served."""
    pytest.importorskip("ray.serve")
    from tests.test_serve import REPO, free_port

    process = subprocess.Popen([sys.executable, "-m", "mixtral_export", "serve", str(tiny_onnx), "--ray", "--host",
                                "127.0.0.1", "--port", str(free_port()), "--threads", "1"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **private_dirs})
    processes, deadline = {}, time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # until Ray's raylet runs: mid-start
        processes |= descendants(process.pid)
        if any("raylet" in command_line(pid) for pid in processes):
            break
        time.sleep(0.05)
    else:
        process.kill()
        pytest.fail(f"no raylet came up: {process.communicate()[0]}")
    process.send_signal(sig)
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
    assert process.returncode == 0, output
    assert "replicas, on http" not in output, output  # it stopped before serving
    assert_nothing_left(processes, private_dirs)
