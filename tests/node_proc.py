"""The node as a real process for tests: ``modelnode serve`` on a free loopback port.

Usage::

    with node_process(tmp_path) as node:          # or: node = NodeProcess.start(tmp_path)
        run(["echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.port)])

The configuration is written to ``<workdir>/modelnode.toml`` (extra TOML sections through
``peers`` and ``extra``), data lives in ``<workdir>/data``, the log in ``<workdir>/node.log``.

The registry starts empty: ``[models] register_reference = false``, because most tests state
which models they have (and count what C-FIND, the index or the selection return). Registering
the three reference models at a first start costs about 40 ms; ``reference_models=True`` starts
the node as a user's first ``modelnode serve`` does, with them registered.
The process is stopped by its own pid (SIGTERM, then SIGKILL); :meth:`NodeProcess.kill` sends
SIGKILL straight away for crash tests, and :meth:`NodeProcess.restart` starts it again on the same
port and data directory.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peers import free_port, wait_port

REPO = Path(__file__).resolve().parent.parent
# ``python -m node.cli`` needs a __main__ module; calling main() works with or without one.
MODELNODE = [sys.executable, "-c", "import sys; from node.cli import main; sys.exit(main())"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def write_config(path: Path, sections: dict[str, dict[str, Any]], peers: list[dict[str, Any]],
                 users: list[dict[str, Any]] | None = None) -> Path:
    lines: list[str] = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items())
        lines.append("")
    for p in peers:
        lines.append("[[peers]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in p.items())
        lines.append("")
    for u in users or []:
        lines.append("[[users]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in u.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclass
class NodeProcess:
    workdir: Path
    port: int
    ae_title: str
    config_path: Path
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    web_port: int = 0  # the console's port (``web=True``); 0: the console is off

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        ae_title: str = "MODELNODE",
        port: int | None = None,
        peers: list[dict[str, Any]] | None = None,
        node: dict[str, Any] | None = None,
        storage: dict[str, Any] | None = None,
        extra: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        data_dir: Path | None = None,
        reference_models: bool = False,
        web: bool = False,
        users: list[dict[str, Any]] | None = None,
        timeout: float = 30.0,
    ) -> NodeProcess:
        """Write a configuration into ``workdir`` and start the node; returns once it listens.

        ``node`` / ``storage`` add keys to those sections (e.g. ``{"allow_list": True}``),
        ``peers`` is a list of ``[[peers]]`` tables, ``users`` of ``[[users]]`` tables, ``extra``
        any other sections.
        ``reference_models``: register the shipped reference models at the first start, as
        ``modelnode serve`` does by default (see the module docstring).
        ``web``: serve the console on a free loopback port (``web_port``, ``web_url``); off
        otherwise, so that nodes started side by side do not contend for its fixed default port.
        """
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        data_dir = data_dir or workdir / "data"
        sections: dict[str, dict[str, Any]] = {
            "node": {"ae_title": ae_title, "bind": "127.0.0.1", "port": port, **(node or {})},
            "storage": {"data_dir": str(data_dir), **(storage or {})},
            "models": {"register_reference": reference_models},
            "web": {"enabled": web, **({"port": free_port()} if web else {})},
        }
        for name, body in (extra or {}).items():
            sections.setdefault(name, {}).update(body)
        cfg = write_config(workdir / "modelnode.toml", sections, peers or [], users)
        self = cls(workdir, port, ae_title, cfg, data_dir, workdir / "node.log", dict(env or {}),
                   web_port=sections["web"].get("port", 0) if sections["web"].get("enabled") else 0)
        self._spawn(timeout)
        return self

    def _spawn(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("MODELNODE_CONFIG", None)
        env.pop("MODELNODE_DATA_DIR", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it; closed right after spawn)
        try:
            self.proc = subprocess.Popen(
                [*MODELNODE, "--config", str(self.config_path), "serve"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
            )
        finally:
            log.close()
        try:
            wait_port(self.port, timeout, self.proc)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n--- node log ---\n{self.log()}") from exc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by pid, SIGKILL if it does not exit in ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, no chance to clean up (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self._spawn(timeout)

    def open_app(self):
        """The node's state opened from its own configuration (for assertions on the index)."""
        from node.app import open_app
        from node.config import load_config

        return open_app(load_config(self.config_path))

    def cli(self, *args: str, timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run ``modelnode --config <this node's file> ARGS`` and return the completed process."""
        return subprocess.run(
            [*MODELNODE, "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout, cwd=REPO, input=stdin,
            env={k: v for k, v in os.environ.items() if k not in ("MODELNODE_CONFIG", "MODELNODE_DATA_DIR")},
        )


@contextmanager
def node_process(workdir: Path, **kw: Any) -> Iterator[NodeProcess]:
    """Start the node (see :meth:`NodeProcess.start`) and stop it by pid on the way out."""
    node = NodeProcess.start(workdir, **kw)
    try:
        yield node
    finally:
        node.stop()


def query(where: NodeProcess | Path, sql: str, *params: object) -> list[tuple]:
    """Rows from a node's SQLite database (a node, or the database file), opened read-only."""
    db = where.data_dir / "modelnode.db" if isinstance(where, NodeProcess) else where
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def jobs(node: NodeProcess) -> list[dict]:
    """``modelnode jobs list --json`` of a running node."""
    res = node.cli("jobs", "list", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wait_jobs(node: NodeProcess, count: int, timeout: float = 120,
              states: tuple[str, ...] = ("done", "exported", "failed")) -> list[dict]:
    """The node's jobs once ``count`` of them are in one of ``states`` (polls its database: the
    state lives in another process)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        finished = [j for j in jobs(node) if j["state"] in states]
        if len(finished) >= count:
            return finished
        time.sleep(0.2)
    raise AssertionError(f"{count} job(s) not finished in {timeout} s\n{node.log()[-4000:]}")


def stored_object(node: NodeProcess, sop_uid: str) -> Path:
    """The file of an instance the node stored (a result, say), by SOP Instance UID."""
    [(digest,)] = query(node, "SELECT digest FROM instance WHERE sop_uid = ?", sop_uid)
    return node.data_dir / "objects" / digest[:2] / digest[2:4] / f"{digest}.dcm"
