"""The local stack: PostgreSQL, a real Cube server, dynalite (DynamoDB) and moto (Secrets Manager,
SQS), each a process on a loopback port, with state under `<repo>/.stack/`:

    .stack/ports.json          ports chosen at first start, reused afterwards
    .stack/cube_api_secret     Cube's HS256 secret (generated once, never committed)
    .stack/pids/<service>.pid  one PID per service; stop signals exactly these
    .stack/logs/<service>.log  output of each service
    .stack/pg/data             the throwaway PostgreSQL cluster
    .stack/env.json, env.sh    what the Lambda code and the tests need to reach the stack
    .stack/kafka.json          the local Kafka endpoint's address (written by devstack.kafka)
    .stack/esm.json            written by devstack.esm once its Kafka consumer has partitions
    .stack/function.json       the function's settings every local tool applies (devstack/function.py)
    .stack/logs/invocations.jsonl  one line per function invocation by the local event sources

The event sources (`kafka`, then `esm`: a Kafka mock cluster and the local event source mappings,
devstack/kafka.py and devstack/esm.py) start after the others, with `start(event_sources=True)`
(what `python -m devstack start` does).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import glob
import hashlib
import hmac
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devstack import _proc, function

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from mypy_boto3_sqs import SQSClient

SERVICES = ("postgres", "moto", "dynalite", "cube")
# Started after SERVICES, in this order, once env.json exists: they read it.
EVENT_SERVICES = ("kafka", "esm")
ALL_SERVICES = SERVICES + EVENT_SERVICES

REGION = "us-east-1"
PG_USER = "cube"
PG_DATABASE = "cube"
DEBOUNCE_TABLE_NAME = "preagg-refresh-debounce"
REFRESH_QUEUE_NAME = "preagg-refresh-trailing"
REFRESH_DLQ_NAME = "preagg-refresh-trailing-dlq"
CUBE_SECRET_NAME = "preagg-refresh/cube-api-secret"  # noqa: S105 - a name, not a secret
# moto draws the random suffix of secret ARNs from a seedable generator: seeding it before the
# secret is created keeps CUBE_API_SECRET_ARN the same across moto restarts.
MOTO_SEED = 20261129
_NULL = "\x02"  # what psql prints for NULL in psql(); no real value contains it
_FIELD_SEP = "\x1f"
_LOCAL_AWS_KEY = "testing"  # moto and dynalite accept any credentials
_INITDB_OPTIONS = ("--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync")
# No unix socket (its path length is limited and its folder must be writable): TCP on loopback only.
# fsync off: a throwaway cluster, speed over durability.
_PG_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
}


class StackError(RuntimeError):
    """A service could not be started or reached; the message carries its log tail."""


class ServiceExited(StackError):
    """The service's process died while it was starting."""


@dataclass(frozen=True)
class StackEnv:
    """Everything the Lambda code (and tests) need to talk to the stack."""

    cube_api_url: str
    cube_api_secret_arn: str
    debounce_table_name: str
    refresh_queue_url: str
    build_dead_letter_queue_url: str
    aws_endpoint_url_dynamodb: str
    aws_endpoint_url_secretsmanager: str
    # What boto3 itself reads: the variable is named after the service id "Secrets Manager", so the
    # one above (kept because the brief names it) is ignored by boto3. Both carry the same URL.
    aws_endpoint_url_secrets_manager: str
    aws_endpoint_url_sqs: str
    aws_default_region: str
    aws_access_key_id: str
    aws_secret_access_key: str
    pg_dsn: str
    cube_api_secret: str
    kafka_bootstrap_servers: str = ""  # empty when the local Kafka endpoint is not running

    def as_environ(self) -> dict[str, str]:
        """The variables by their environment names (CUBE_API_URL, ...)."""
        return {key.upper(): value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    up: bool
    pid: int | None
    url: str

    def line(self) -> str:
        state = "up" if self.up else "down"
        pid = f"pid {self.pid}" if self.pid else "-"
        return f"{self.name:<9} {state:<5} {pid:<11} {self.url}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_hs256(payload: Mapping[str, Any], secret: str) -> str:
    """A compact HS256 JWT (stdlib only)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(dict(payload), separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(signature)}"


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


class Stack:
    """The dev stack rooted at a repository checkout (default: the one holding this package)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or Path(__file__).resolve().parent.parent).resolve()
        self.cube_dir = self.root / "cube"
        self.state = self.root / ".stack"
        self.logs = self.state / "logs"
        self.pids = self.state / "pids"
        self.pg_dir = self._pg_home()
        self.pg_data = self.pg_dir / "data"

    def _pg_home(self) -> Path:
        """Where the cluster lives. As root, PostgreSQL runs as another user, who may not be able to
        enter the checkout (a clone under a 0700 `mktemp -d` folder, say): the cluster then goes to
        a folder of its own under /var/tmp, one per checkout."""
        if os.geteuid() != 0:
            return self.state / "pg"
        digest = hashlib.sha256(str(self.state).encode()).hexdigest()[:12]
        return Path("/var/tmp/preagg-devstack") / digest / "pg"

    # ---------------------------------------------------------------- public API

    def start(
        self, timeout: float = 180.0, *, event_sources: bool = False, settings: Mapping[str, str] | None = None
    ) -> StackEnv:
        """Start every service that is not running, wait until all answer, provision, return env.
        `event_sources` also starts the local Kafka endpoint and the event source mappings. `settings`
        (the function's, e.g. {"CUBE_PREAGG_DEBOUNCE_MS": "5000"}) replace the recorded ones, and a
        running esm with other settings is restarted; None keeps what is recorded."""
        summary = function.validate(settings, self.root) if settings is not None else None
        with self._locked():
            deadline = time.monotonic() + timeout
            self._prepare()
            self._record_settings(settings, summary)
            for name in SERVICES:
                self._spawn(name)
            for name in SERVICES:
                self._wait_ready(name, deadline)
                self._after_ready(name)
            env = self._write_env()
            if event_sources:
                for name in EVENT_SERVICES:
                    self._spawn(name)
                    self._wait_ready(name, deadline)
                    env = self._write_env()
            return env

    def stop(self, purge: bool = False) -> list[str]:
        """Stop every service by its PID (reverse start order); the names of those that were running.
        `purge` then deletes `.stack/`."""
        stopped = []
        with self._locked():
            for name in reversed(ALL_SERVICES):
                if self._pid(name) is not None:
                    stopped.append(name)
                self._stop(name)
        (self.state / function.FILE).unlink(missing_ok=True)  # the next start records its own
        if purge:
            if self.pg_dir.exists() and not self.pg_dir.is_relative_to(self.state):
                shutil.rmtree(self.pg_dir.parent)
            if self.state.exists():
                shutil.rmtree(self.state)
        return stopped

    def start_service(self, name: str, timeout: float = 120.0, *, settings: Mapping[str, str] | None = None) -> None:
        """(Re)start one stopped service, e.g. Cube after a test stopped it. `settings` as for start()."""
        self._check_name(name)
        summary = function.validate(settings, self.root) if settings is not None else None
        with self._locked():
            self._prepare()
            self._record_settings(settings, summary)
            self._spawn(name)
            self._wait_ready(name, time.monotonic() + timeout)
            if name in SERVICES:
                self._after_ready(name)
            self._write_env()

    def set_function_settings(self, settings: Mapping[str, str]) -> str:
        """Record the function's settings (validated) without starting anything; the summary."""
        summary = function.validate(settings, self.root)
        with self._locked():
            self.state.mkdir(parents=True, exist_ok=True)
            function.record(self.state, settings, summary)
        return summary

    def function_settings(self) -> dict[str, Any]:
        """`{"environ": {...}, "summary": "..."}`: the function's settings every local tool applies."""
        return function.recorded(self.state)

    def _record_settings(self, settings: Mapping[str, str] | None, summary: str | None) -> None:
        """Record `settings` (None: keep the record; record the defaults when there is none). A running
        esm whose settings differ from the record is stopped, to be started again with them."""
        if settings is None:
            if function.recorded(self.state):
                return
            settings, summary = {}, function.validate({}, self.root)
        function.record(self.state, settings, summary or "")
        if self._pid("esm") is not None and self._read_state("esm").get("environ") != dict(settings):
            print("devstack: restarting esm: the function's settings changed", file=sys.stderr)
            self._stop("esm")

    def stop_service(self, name: str) -> None:
        self._check_name(name)
        with self._locked():
            self._stop(name)

    def status(self) -> dict[str, ServiceStatus]:
        ports = self._read_ports()
        result = {}
        for name in SERVICES:
            pid = self._pid(name)
            port = ports.get(name)
            up = pid is not None and port is not None and self._answers(name, port)
            result[name] = ServiceStatus(name, up, pid, self._url(name, port) if port else "(never started)")
        for name in EVENT_SERVICES:
            pid = self._pid(name)
            up = pid is not None and self._answers(name, 0)
            result[name] = ServiceStatus(name, up, pid, self._event_url(name) if up else "(not running)")
        return result

    def _event_url(self, name: str) -> str:
        if name == "kafka":
            return str(self._read_state("kafka").get("bootstrap", ""))
        data = self._read_state("esm")
        return f"kafka {data.get('kafka') or '-'}; sqs {data.get('sqs')}"

    def _read_state(self, name: str) -> dict[str, Any]:
        """`.stack/kafka.json` / `.stack/esm.json`, written by the process once it is ready ({} before)."""
        try:
            data = json.loads((self.state / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def env(self) -> StackEnv:
        """The environment written by the last start (raises if the stack was never started)."""
        try:
            data = json.loads((self.state / "env.json").read_text())
        except FileNotFoundError:
            raise StackError("the stack has not been started: run `python -m devstack start`") from None
        try:
            return StackEnv(**{key.lower(): value for key, value in data.items()})
        except TypeError:
            raise StackError("stale .stack/env.json (written by an older devstack): run start again") from None

    def psql(self, sql: str, database: str = PG_DATABASE) -> list[tuple[str | None, ...]]:
        """Run SQL through the psql client; rows of the last statement as tuples of text (NULL -> None)."""
        # Unaligned, tuples only, fields split by US (0x1f), records by NUL: values may hold newlines.
        out = self._psql(["-q", "-A", "-t", "-F", _FIELD_SEP, "-0", "-P", f"null={_NULL}", "-c", sql], database)
        records = out.split("\0")
        if records and records[-1].strip() == "":
            records.pop()  # what follows the last record separator
        return [tuple(None if field == _NULL else field for field in record.split(_FIELD_SEP)) for record in records]

    def reseed(self) -> None:
        """Recreate the source tables from cube/seed.sql (pre-aggregation schemas are left alone)."""
        self._psql(["-q", "-f", str(self.cube_dir / "seed.sql")], PG_DATABASE)

    def cube_token(self, payload: Mapping[str, Any], ttl: int = 300) -> str:
        """An HS256 token for the local Cube (adds `exp` = now + ttl unless given)."""
        claims = {"exp": int(time.time()) + ttl, **payload}
        return sign_hs256(claims, self._cube_secret())

    # ---------------------------------------------------------------- state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One start/stop at a time (parallel test workers may all call start())."""
        self.state.mkdir(parents=True, exist_ok=True)
        with (self.state / "lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _check_name(self, name: str) -> None:
        if name not in ALL_SERVICES:
            raise ValueError(f"unknown service {name!r}; one of {', '.join(ALL_SERVICES)}")

    def _read_ports(self) -> dict[str, int]:
        try:
            data = json.loads((self.state / "ports.json").read_text())
        except FileNotFoundError:
            return {}
        return {str(key): int(value) for key, value in data.items()}

    def _ports(self) -> dict[str, int]:
        ports = self._read_ports()
        missing = [name for name in SERVICES if name not in ports]
        if missing:
            taken = set(ports.values())
            for name in missing:
                port = _proc.free_port()
                while port in taken:
                    port = _proc.free_port()
                ports[name] = port
                taken.add(port)
            (self.state / "ports.json").write_text(json.dumps(ports, indent=2) + "\n")
        return ports

    def _cube_secret(self) -> str:
        path = self.state / "cube_api_secret"
        if not path.exists():
            self.state.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        return path.read_text().strip()

    def _pid_file(self, name: str) -> Path:
        return self.pids / f"{name}.pid"

    def _pid(self, name: str) -> int | None:
        return _proc.read_pid(self._pid_file(name), _MARKERS[name])

    def _log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def _url(self, name: str, port: int) -> str:
        if name == "postgres":
            return f"postgresql://{PG_USER}@127.0.0.1:{port}/{PG_DATABASE}"
        if name == "cube":
            return f"http://127.0.0.1:{port}/cubejs-api"
        return f"http://127.0.0.1:{port}"

    # ---------------------------------------------------------------- preparation

    def _prepare(self) -> None:
        for folder in (self.state, self.logs, self.pids):
            folder.mkdir(parents=True, exist_ok=True)
        self._ports()
        self._cube_secret()
        self._ensure_node_modules()
        self._ensure_cluster()

    def _ensure_node_modules(self) -> None:
        """`npm ci --ignore-scripts` when cube/node_modules is missing or older than the lockfile."""
        lock = self.cube_dir / "package-lock.json"
        stamp = self.cube_dir / "node_modules" / ".devstack-lock.sha256"
        digest = hashlib.sha256(lock.read_bytes()).hexdigest()
        if stamp.is_file() and stamp.read_text().strip() == digest:
            return
        npm = shutil.which("npm")
        if npm is None:
            raise StackError("npm is not on PATH (Node 20+ is required for Cube and dynalite)")
        print("devstack: npm ci --ignore-scripts in cube/ (first start, ~30 s)", file=sys.stderr)
        # --ignore-scripts: Cube Store's install script downloads a binary from GitHub (docs/local-stack-notes.md).
        result = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=self.cube_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"npm ci failed in {self.cube_dir}:\n{result.stdout}\n{result.stderr}")
        stamp.write_text(digest + "\n")

    def _pg_user(self) -> tuple[int, int] | None:
        """PostgreSQL refuses to run as root: run it as `postgres` (or `nobody`) when we are root."""
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return entry.pw_uid, entry.pw_gid
        raise StackError("running as root and there is no `postgres` user to run PostgreSQL as")

    def _pg_bin(self, tool: str) -> str:
        bindir = _pg_bindir()
        if bindir is None:
            bindir = self._install_postgres()
        path = bindir / tool
        found = str(path) if path.exists() else shutil.which(tool)
        if found is None:
            raise StackError(f"PostgreSQL tool {tool!r} not found (looked in {bindir} and PATH)")
        return found

    def _install_postgres(self) -> Path:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise StackError("PostgreSQL server binaries not found; install them (Debian: apt-get install postgresql)")
        print("devstack: PostgreSQL not found, running apt-get install -y postgresql", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
            subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
        bindir = _pg_bindir()
        if bindir is None:
            raise StackError("apt-get install postgresql did not provide initdb")
        return bindir

    def _ensure_cluster(self) -> None:
        if (self.pg_data / "PG_VERSION").exists():
            return
        user = self._pg_user()
        if self.pg_data.exists():  # a half-made cluster from an interrupted first start
            shutil.rmtree(self.pg_data)
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        (self.pg_dir / "seeded").unlink(missing_ok=True)
        if user:
            os.chown(self.pg_dir, *user)
        argv = [self._pg_bin("initdb"), "-D", str(self.pg_data), "-U", PG_USER, *_INITDB_OPTIONS]
        as_user: dict[str, Any] = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
        result = subprocess.run(argv, cwd=self.pg_dir, capture_output=True, text=True, check=False, **as_user)
        if result.returncode != 0:
            raise StackError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    # ---------------------------------------------------------------- processes

    def _launch(self, name: str, port: int) -> tuple[list[str], Path, dict[str, str]]:
        env = dict(os.environ)
        if name in EVENT_SERVICES:
            for setting in function.names():  # the esm applies .stack/function.json, nothing inherited
                env.pop(setting, None)
            env["PYTHONPATH"] = os.pathsep.join([str(self.root / "src"), str(self.root)])
            env["PYTHONUNBUFFERED"] = "1"
            (self.state / f"{name}.json").unlink(missing_ok=True)
            arg = str(self.state / "kafka.json") if name == "kafka" else str(self.root)
            return [sys.executable, "-m", f"devstack.{name}", arg], self.root, env
        node = shutil.which("node") or "node"
        if name == "postgres":
            settings = [f"--{key}={value}" for key, value in _PG_SETTINGS.items()]
            return [self._pg_bin("postgres"), "-D", str(self.pg_data), "-p", str(port), *settings], self.pg_dir, env
        if name == "moto":
            moto = Path(sys.executable).parent / "moto_server"
            if not moto.exists():
                moto = self.root / ".venv" / "bin" / "moto_server"
            argv = [str(moto), "-H", "127.0.0.1", "-p", str(port)]
            return argv, self.state, env
        if name == "dynalite":
            cli = self.cube_dir / "node_modules" / "dynalite" / "cli.js"
            # Tables become ACTIVE at once instead of after 500 ms.
            delays = ["--createTableMs=0", "--deleteTableMs=0", "--updateTableMs=0"]
            return [node, str(cli), "--host=127.0.0.1", f"--port={port}", *delays], self.state, env
        # Cube: the server entry point directly (the CLI refuses Node 20), with the native shim.
        pg_port = self._read_ports()["postgres"]
        env.update(
            {
                "PORT": str(port),
                "NODE_ENV": "production",
                "CUBEJS_DB_TYPE": "postgres",
                "CUBEJS_DB_HOST": "127.0.0.1",
                "CUBEJS_DB_PORT": str(pg_port),
                "CUBEJS_DB_NAME": PG_DATABASE,
                "CUBEJS_DB_USER": PG_USER,
                "CUBEJS_DB_PASS": "",
                "CUBEJS_DB_SSL": "false",
                "CUBEJS_API_SECRET": self._cube_secret(),
                "CUBEJS_EXTERNAL_DEFAULT": "false",
                "CUBEJS_CACHE_AND_QUEUE_DRIVER": "memory",
                "CUBEJS_TESSERACT_SQL_PLANNER": "false",
                "CUBEJS_TRANSPILATION_NATIVE": "false",
                "CUBEJS_DEV_MODE": "false",
                "CUBEJS_REFRESH_WORKER": "false",
                "CUBEJS_SCHEDULED_REFRESH_DEFAULT": "false",
                "CUBEJS_TELEMETRY": "false",
            }
        )
        for inherited in ("CUBEJS_PG_SQL_PORT", "CUBEJS_SQL_PORT", "CUBESTORE_HOST", "NODE_OPTIONS"):
            env.pop(inherited, None)
        server = "node_modules/@cubejs-backend/server/dist/src/bin/server.js"
        return [node, "--require", "./native-shim.js", server], self.cube_dir, env

    def _spawn(self, name: str) -> None:
        if self._pid(name) is not None:
            return  # already running: reuse (readiness is checked next)
        if name in EVENT_SERVICES:
            argv, cwd, env = self._launch(name, 0)
            _proc.write_pid(self._pid_file(name), _proc.spawn(argv, cwd=cwd, env=env, log=self._log(name)))
            return
        port = self._ports()[name]
        if _proc.port_open(port):
            raise StackError(
                f"{name}: port {port} is in use by a process that is not ours "
                f"(no live PID in {self._pid_file(name)}); stop it, or delete {self.state / 'ports.json'}"
            )
        argv, cwd, env = self._launch(name, port)
        user = self._pg_user() if name == "postgres" else None
        pid = _proc.spawn(argv, cwd=cwd, env=env, log=self._log(name), user=user)
        _proc.write_pid(self._pid_file(name), pid)

    def _answers(self, name: str, port: int) -> bool:
        if name in EVENT_SERVICES:
            data = self._read_state(name)
            if data.get("pid") != self._pid(name):
                return False
            if name == "kafka":
                host, _, kafka_port = str(data.get("bootstrap", "")).rpartition(":")
                return host == "127.0.0.1" and kafka_port.isdigit() and _proc.port_open(int(kafka_port))
            return True
        if name == "postgres":
            result = subprocess.run(
                [self._pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-d", "postgres"],
                check=False,
            )
            return result.returncode == 0
        if name == "cube":
            return _proc.http_status(f"http://127.0.0.1:{port}/readyz") == 200
        return _proc.http_status(f"http://127.0.0.1:{port}/") is not None

    def _wait_ready(self, name: str, deadline: float) -> None:
        port = self._ports()[name] if name in SERVICES else 0
        while True:
            pid = self._pid(name)
            if pid is None:
                code = self._spawned_exit_code(name)
                how = f" with status {code}" if code is not None else ""
                self._fail(name, f"{name} exited during start{how}", ServiceExited)
            if self._answers(name, port):
                return
            if time.monotonic() > deadline:
                self._fail(name, f"{name} (pid {pid}) did not answer on port {port} in time")
            time.sleep(0.1)

    def _spawned_exit_code(self, name: str) -> int | None:
        try:
            return _proc.exit_code(int(self._pid_file(name).read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            return None

    def _fail(self, name: str, message: str, error: type[StackError] = StackError) -> None:
        """Stop the service (a half-working one would be reused by the next start) and raise."""
        self._stop(name)
        log = self._log(name)
        raise error(f"{message}; stopped it. Last lines of {log}:\n{_proc.tail(log)}")

    def _stop(self, name: str) -> None:
        pid = self._pid(name)
        if pid is not None:
            # SIGINT is PostgreSQL's "fast" shutdown; everything else takes SIGTERM.
            _proc.terminate(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        self._pid_file(name).unlink(missing_ok=True)

    # ---------------------------------------------------------------- provisioning

    def _after_ready(self, name: str) -> None:
        if name == "postgres":
            self._seed_once()
        elif name == "moto":
            self._provision_moto()
        elif name == "dynalite":
            self._provision_dynalite()
        elif name == "cube":
            self._check_cube_model()

    def _psql(self, args: list[str], database: str) -> str:
        port = self._read_ports().get("postgres")
        if port is None:
            raise StackError("the stack has not been started: run `python -m devstack start`")
        connection = ["-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-d", database]
        argv = [self._pg_bin("psql"), "-X", "-v", "ON_ERROR_STOP=1", *connection, *args]
        env = {**os.environ, "PGCONNECT_TIMEOUT": "5", "PGOPTIONS": "-c client_min_messages=warning"}
        result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        if result.returncode != 0:
            raise StackError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def _seed_once(self) -> None:
        """Seed on the first start, and again when cube/seed.sql changed since (the marker keeps the
        digest of the seed it was made from: a `git pull` that changes the seed must not leave the
        old data in place)."""
        marker = self.pg_dir / "seeded"
        digest = hashlib.sha256((self.cube_dir / "seed.sql").read_bytes()).hexdigest()
        if marker.exists():
            if digest in marker.read_text():
                return
            print("devstack: cube/seed.sql changed since the data was seeded: reseeding", file=sys.stderr)
        query = f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'"  # noqa: S608 - a constant
        exists = self._psql(["-A", "-t", "-c", query], "postgres")
        if not exists.strip():
            self._psql(["-q", "-c", f'CREATE DATABASE "{PG_DATABASE}"'], "postgres")
        self.reseed()
        marker.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} seed.sql sha256 {digest}\n")

    def _aws(self, service: str, port: int) -> Any:
        import boto3  # noqa: PLC0415 - lazily: stop/status/env need no boto3 (~0.2 s to import)

        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name=REGION,
            aws_access_key_id=_LOCAL_AWS_KEY,
            aws_secret_access_key=_LOCAL_AWS_KEY,
        )

    def _provision_moto(self) -> None:
        port = self._ports()["moto"]
        _proc.http_status(f"http://127.0.0.1:{port}/moto-api/seed?a={MOTO_SEED}", method="POST", timeout=5)
        sm: SecretsManagerClient = self._aws("secretsmanager", port)
        secret = self._cube_secret()
        try:
            current = sm.get_secret_value(SecretId=CUBE_SECRET_NAME)["SecretString"]
        except sm.exceptions.ResourceNotFoundException:
            sm.create_secret(Name=CUBE_SECRET_NAME, SecretString=secret)
        else:
            if current != secret:
                sm.put_secret_value(SecretId=CUBE_SECRET_NAME, SecretString=secret)
        sqs: SQSClient = self._aws("sqs", port)
        create_refresh_queues(sqs, self.root / "template.yaml", REFRESH_QUEUE_NAME, REFRESH_DLQ_NAME)

    def _provision_dynalite(self) -> None:
        port = self._ports()["dynalite"]
        ddb: DynamoDBClient = self._aws("dynamodb", port)
        if DEBOUNCE_TABLE_NAME in ddb.list_tables()["TableNames"]:
            return
        create_debounce_table(ddb, self.root / "template.yaml", DEBOUNCE_TABLE_NAME)

    def _check_cube_model(self) -> None:
        """An authenticated /v1/meta for tenant-a: proves the model compiles, not just that Cube listens."""
        port = self._ports()["cube"]
        token = self.cube_token({"tenantId": "tenant-a"})
        status = _proc.http_status(
            f"http://127.0.0.1:{port}/cubejs-api/v1/meta", headers={"Authorization": token}, timeout=30
        )
        if status != 200:
            self._fail("cube", f"cube answers /readyz but GET /v1/meta for tenant-a gave {status}")

    def _secret_arn(self) -> str:
        sm: SecretsManagerClient = self._aws("secretsmanager", self._ports()["moto"])
        return sm.describe_secret(SecretId=CUBE_SECRET_NAME)["ARN"]

    def _queue_url(self, name: str = REFRESH_QUEUE_NAME) -> str:
        sqs: SQSClient = self._aws("sqs", self._ports()["moto"])
        return sqs.get_queue_url(QueueName=name)["QueueUrl"]

    def _write_env(self) -> StackEnv:
        ports = self._ports()
        moto = f"http://127.0.0.1:{ports['moto']}"
        env = StackEnv(
            cube_api_url=self._url("cube", ports["cube"]),
            cube_api_secret_arn=self._secret_arn(),
            debounce_table_name=DEBOUNCE_TABLE_NAME,
            refresh_queue_url=self._queue_url(),
            build_dead_letter_queue_url=self._queue_url(REFRESH_DLQ_NAME),
            aws_endpoint_url_dynamodb=f"http://127.0.0.1:{ports['dynalite']}",
            aws_endpoint_url_secretsmanager=moto,
            aws_endpoint_url_secrets_manager=moto,
            aws_endpoint_url_sqs=moto,
            aws_default_region=REGION,
            aws_access_key_id=_LOCAL_AWS_KEY,
            aws_secret_access_key=_LOCAL_AWS_KEY,
            pg_dsn=self._url("postgres", ports["postgres"]),
            cube_api_secret=self._cube_secret(),
            kafka_bootstrap_servers=str(self._read_state("kafka").get("bootstrap", "")) if self._pid("kafka") else "",
        )
        environ = env.as_environ()
        (self.state / "env.json").write_text(json.dumps(environ, indent=2) + "\n")
        (self.state / "env.sh").write_text(
            "# generated by `python -m devstack start`; source it to reach the local stack\n"
            + "".join(f"export {key}={shlex.quote(value)}\n" for key, value in environ.items())
        )
        for path in (self.state / "env.json", self.state / "env.sh"):
            path.chmod(0o600)
        return env


def create_refresh_queues(sqs: SQSClient, template: Path, name: str, dlq_name: str) -> tuple[str, str]:
    """The refresh queue and its dead-letter queue as template.yaml sets them (visibility timeout, redrive
    after maxReceiveCount); (queue URL, DLQ URL). Idempotent."""
    from devstack.template import event_sources  # noqa: PLC0415 - PyYAML: status/stop run without .venv

    sources = event_sources(template)
    dlq_url = sqs.create_queue(QueueName=dlq_name)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(sources.max_receive_count)}
    sqs.set_queue_attributes(
        QueueUrl=queue_url,
        Attributes={"VisibilityTimeout": str(sources.visibility_timeout_s), "RedrivePolicy": json.dumps(redrive)},
    )
    return queue_url, dlq_url


def create_debounce_table(ddb: DynamoDBClient, template: Path, name: str) -> None:
    """A table with the debounce table's key schema and indexes from template.yaml, once it is ACTIVE."""
    from devstack.template import debounce_table_spec  # noqa: PLC0415

    spec = debounce_table_spec(template)
    kwargs: dict[str, Any] = {
        "TableName": name,
        "KeySchema": spec.key_schema,
        "AttributeDefinitions": spec.attribute_definitions,
        "BillingMode": "PAY_PER_REQUEST",
    }
    if spec.global_secondary_indexes:
        kwargs["GlobalSecondaryIndexes"] = spec.global_secondary_indexes
    ddb.create_table(**kwargs)
    ddb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1})
    # dynalite has no UpdateTimeToLive (docs/local-stack-notes.md); TTL never expires items locally anyway.


# PID files written by an older devstack hold no start time: such a process is ours only if its
# command line contains this.
_MARKERS = {
    "postgres": "postgres",
    "moto": "moto_server",
    "dynalite": "dynalite",
    "cube": "server.js",
    "kafka": "devstack.kafka",
    "esm": "devstack.esm",
}
