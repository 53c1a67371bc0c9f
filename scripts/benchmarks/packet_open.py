"""Packet opens (re-identification) per second and p50/p99 under load, against GET /healthz
(the target's ceiling) and GET /v1/me (the same token check, no work) in the same run."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
from _common import postgres_database
from fastapi.testclient import TestClient

from service.config import PROJECT_ROOT, Settings
from service.crypto.keyring import Keyring
from service.db import Database, migrate
from service.main import create_app
from service.records.demo import synthetic_bsn

MIGRATIONS = PROJECT_ROOT / "alembic"
AS_OF = date(2026, 3, 15)
# A history the shipped policy's relapse rule flags (3 returns within 24 months of AS_OF).
RELAPSING = (
    ("welfare_start", "2023-01-02"),
    ("welfare_end", "2024-03-01"),
    ("employment_end", "2024-06-30"),
    ("welfare_start", "2024-07-01"),
    ("welfare_end", "2024-09-01"),
    ("employment_end", "2025-01-31"),
    ("welfare_start", "2025-02-03"),
    ("welfare_end", "2025-04-01"),
    ("employment_end", "2025-09-30"),
    ("welfare_start", "2025-10-01"),
)


@dataclass(frozen=True)
class Phase:
    label: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    unavailable: int = 0
    # Set when the load generator reports percentiles itself (wrk); else computed from latencies.
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    # CPU spent during the phase by the service's processes and by PostgreSQL's (Linux only).
    cpu: CpuUse | None = None

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        given = {50.0: self.p50_ms, 99.0: self.p99_ms}.get(float(p))
        if given is not None:
            return given
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    @property
    def mean(self) -> float:
        if self.mean_ms is not None:
            return self.mean_ms
        return statistics.fmean(self.latencies_ms) if self.latencies_ms else float("nan")


class Round(NamedTuple):
    ceiling: Phase  # GET /healthz
    authenticated: Phase  # GET /v1/me
    opened: Phase  # GET /v1/packets/{id}/clients


@dataclass(frozen=True)
class CpuUse:
    service_seconds: float
    database_seconds: float


# -- CPU accounting ---------------------------------------------------------------------------
#
# Each phase also reports the CPU time (user + system, from /proc) that the service's worker
# processes and PostgreSQL's processes spent in it, per request: where the CPU goes, measured
# under the same load, rather than guessed from throughput. Linux only; elsewhere it is left out.


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(command name, parent pid, CPU seconds) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks


def cpu_now(server_pid: int) -> tuple[float, float] | None:
    """CPU seconds so far of the server's process tree and of every PostgreSQL process."""
    if not os.path.isdir("/proc"):
        return None
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            processes[int(entry)] = stat
    tree = {server_pid}
    grew = True
    while grew:
        found = {pid for pid, (_, parent, _) in processes.items() if parent in tree}
        grew = not found <= tree
        tree |= found
    service = sum(processes[pid][2] for pid in tree if pid in processes)
    database = sum(cpu for name, _, cpu in processes.values() if name.startswith("postgres"))
    return service, database


# -- data -------------------------------------------------------------------------------------


def subject(index: int, district: str) -> dict[str, Any]:
    return {
        "identity": {
            "bsn": synthetic_bsn(index, seed=2026),
            "given_name": f"Client{index}",
            "family_name": "Benchmark",
            "birth_date": "1985-03-04",
            "street": f"Dordtselaan {index % 300 + 1}",
            "postcode": "3073 AA",
            "city": "Rotterdam",
            "phone": "+31 10 000 0000",
            "email": f"client{index}@example.org",
        },
        "characteristics": {"district": district, "neighbourhood": "Tarwewijk"},
        "events": [
            {
                "type": kind,
                "date": day,
                "office": "Werkplein Zuid",
                "source_event_id": f"{index}-{n}",
            }
            for n, (kind, day) in enumerate(RELAPSING)
        ],
    }


def prepare(settings: Settings, *, professionals: int, packet_size: int) -> list[tuple[str, str]]:
    """Through the API: ingest, flag, register professionals, partition. Returns
    (professional, packet id) pairs, one packet of ``packet_size`` clients each."""
    database = Database(settings)
    try:
        app = create_app(settings, database=database)
        issuer = app.state.dev_issuer
        source = {"Authorization": f"Bearer {issuer.mint(subject='source', roles=['source'])}"}
        coordinator = {
            "Authorization": f"Bearer {issuer.mint(subject='coord', roles=['coordinator'])}"
        }
        with TestClient(app) as client:
            records = [
                subject(p * packet_size + i, f"district-{p:02d}")
                for p in range(professionals)
                for i in range(packet_size)
            ]
            for start in range(0, len(records), 500):
                batch = {"subjects": records[start : start + 500]}
                response = client.post("/v1/records/batch", json=batch, headers=source)
                response.raise_for_status()
            for p in range(professionals):
                client.post(
                    "/v1/professionals",
                    json={
                        "id": f"prof-{p:03d}",
                        "display_name": f"Caseworker {p}",
                        "team": "Zuid",
                        "districts": [f"district-{p:02d}"],
                        "capacity": packet_size,
                    },
                    headers=coordinator,
                ).raise_for_status()
            run = client.post(
                "/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator
            )
            run.raise_for_status()
            parted = client.post(
                "/v1/packets/partition", json={"run_id": run.json()["id"]}, headers=coordinator
            )
            parted.raise_for_status()
            return sorted((p["professional_id"], p["id"]) for p in parted.json()["packets"])
    finally:
        database.dispose()


# -- load -------------------------------------------------------------------------------------
#
# wrk (C, epoll) drives the server when it is installed: it costs a fraction of a core, so the
# figures describe the service rather than the client. A Lua script cycles through the targets
# (each thread starting at a different offset) and reports its figures as one JSON line. Without
# wrk (and not root, so it cannot be installed) a Python asyncio client in its own process is the
# fallback; it is CPU-bound on a small machine and then measures mostly itself.

WRK_SCRIPT = """
local targets = {%(targets)s}
local threads = {}
local counter = 1

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  position = id
  non200 = 0
  unavailable = 0
end

function request()
  local target = targets[(position %% #targets) + 1]
  position = position + 1
  return wrk.format("GET", target[1], target[2])
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
    if status == 503 then unavailable = unavailable + 1 end
  end
end

function done(summary, latency, requests)
  local non, busy = 0, 0
  for _, thread in ipairs(threads) do
    non = non + thread:get("non200")
    busy = busy + thread:get("unavailable")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests": %%d, "seconds": %%f, "non200": %%d, "unavailable": %%d, ' ..
    '"socket_errors": %%d, "p50_us": %%d, "p99_us": %%d, "mean_us": %%f, "max_us": %%d}\\n',
    summary.requests, summary.duration / 1e6, non, busy,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class Target:
    path: str
    headers: dict[str, str]


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ensure_wrk(python_client: bool) -> str | None:
    """The wrk binary, installing it with apt-get when missing and running as root."""
    if python_client:
        return None
    found = shutil.which("wrk")
    apt = shutil.which("apt-get")
    if found is None and apt is not None and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("wrk is missing; installing it with apt-get (running as root) …")
        subprocess.run(
            [apt, "install", "-y", "-q", "wrk"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        found = shutil.which("wrk")
    if found is None:
        print("wrk is not available: falling back to the Python client (it shares the CPUs and")
        print("saturates first, so the ratio and the p99 are dominated by the client)")
    return found


def run_wrk(
    wrk: str,
    label: str,
    base: str,
    targets: list[Target],
    *,
    connections: int,
    threads: int,
    seconds: float,
) -> Phase:
    def entry(target: Target) -> str:
        headers = ", ".join(
            f"[{lua_string(k)}] = {lua_string(v)}" for k, v in target.headers.items()
        )
        return "{" + lua_string(target.path) + ", {" + headers + "}}"

    entries = ", ".join(entry(t) for t in targets)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % {"targets": entries})
    try:
        completed = subprocess.run(
            [
                wrk,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                base,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    finally:
        os.unlink(script.name)
    line = next((x for x in completed.stdout.splitlines() if x.startswith("WRK-RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{completed.stdout}\n{completed.stderr}")
    result = json.loads(line.removeprefix("WRK-RESULT "))
    return Phase(
        label,
        requests=result["requests"],
        errors=result["non200"] + result["socket_errors"],
        seconds=result["seconds"],
        latencies_ms=[],
        unavailable=result["unavailable"],
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        mean_ms=result["mean_us"] / 1000,
    )


async def _drive(
    targets: list[tuple[str, dict[str, str]]], *, concurrency: int, total: int, limit_s: float
) -> tuple[int, int, float, list[float]]:
    latencies: list[float] = []
    errors = 0
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        started = time.perf_counter()
        deadline = started + limit_s

        async def worker(number: int) -> None:
            nonlocal errors, issued
            position = number
            while issued < total and time.perf_counter() < deadline:
                issued += 1
                url, headers = targets[position % len(targets)]
                position += concurrency
                sent = time.perf_counter()
                response = await client.get(url, headers=headers)
                latencies.append((time.perf_counter() - sent) * 1000)
                if response.status_code != 200:
                    errors += 1

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies), errors, elapsed, latencies


def load_process(
    targets: list[tuple[str, dict[str, str]]],
    concurrency: int,
    total: int,
    limit_s: float,
    queue: Any,
) -> None:
    queue.put(asyncio.run(_drive(targets, concurrency=concurrency, total=total, limit_s=limit_s)))


def run_python(
    label: str,
    base: str,
    targets: list[Target],
    *,
    concurrency: int,
    total: int,
    limit_s: float,
) -> Phase:
    """Drive the server closed-loop from a separate process."""
    pairs = [(base + t.path, t.headers) for t in targets]
    return in_child(label, load_process, (pairs, concurrency, total, limit_s), limit_s=limit_s)


def in_child(label: str, target: Any, args: tuple[Any, ...], *, limit_s: float) -> Phase:
    """Run a Python load generator in its own process, so it does not share our GIL; ``target``
    puts its ``(requests, errors, seconds, latencies)`` on the queue passed last."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    requests, errors, seconds, latencies = queue.get(timeout=limit_s + 120)
    process.join()
    return Phase(label, requests, errors, seconds, latencies)


# Open loop: requests leave on a fixed schedule whatever the server does, and each latency runs
# from the scheduled send time, so a stalled server cannot hide its stall by slowing the client
# (no coordinated omission). This answers "how fast is an open at a given load", the figure a
# municipality sizing its deployment needs; the closed-loop phases answer "how many at most".


async def _drive_at_rate(
    targets: list[tuple[str, dict[str, str]]], *, rate: float, seconds: float
) -> tuple[int, int, float, list[float]]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:

        async def one(number: int, scheduled: float) -> None:
            nonlocal errors
            url, headers = targets[number % len(targets)]
            response = await client.get(url, headers=headers)
            latencies.append((time.perf_counter() - scheduled) * 1000)
            if response.status_code != 200:
                errors += 1

        started = time.perf_counter()
        tasks = []
        for number in range(int(rate * seconds)):
            scheduled = started + number / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(number, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return len(latencies), errors, elapsed, latencies


def rate_process(
    targets: list[tuple[str, dict[str, str]]], rate: float, seconds: float, queue: Any
) -> None:
    queue.put(asyncio.run(_drive_at_rate(targets, rate=rate, seconds=seconds)))


def run_at_rate(
    label: str, base: str, targets: list[Target], *, rate: float, seconds: float
) -> Phase:
    """Drive the server open-loop at ``rate`` requests per second from a separate process."""
    pairs = [(base + t.path, t.headers) for t in targets]
    return in_child(label, rate_process, (pairs, rate, seconds), limit_s=seconds)


# -- server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(env: dict[str, str], port: int, workers: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise RuntimeError("the server did not come up within 60 s")


def bench_backend(
    label: str, url: str, args: argparse.Namespace, wrk: str | None
) -> tuple[list[Round], list[Phase]]:
    home = Path(tempfile.mkdtemp(prefix="cp-bench-open-"))
    try:
        Keyring.init(home / "keyring.json")
        migrate(url, MIGRATIONS)
        env = {
            "CASEPACKETS_ENV": "development",
            "CASEPACKETS_HOME": str(home),
            "CASEPACKETS_DATABASE_URL": url,
            "CASEPACKETS_SHRED_INTERVAL_SECONDS": "0",
        }
        settings = Settings(env="development", home=home, database_url=url)
        started = time.perf_counter()
        packets = prepare(settings, professionals=args.professionals, packet_size=args.packet_size)
        print(
            f"[{label}] prepared {len(packets)} packets of {args.packet_size} clients "
            f"in {time.perf_counter() - started:.1f} s"
        )
        database = Database(settings)
        try:
            issuer = create_app(settings, database=database).state.dev_issuer
        finally:
            database.dispose()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        opens = [
            Target(
                f"/v1/packets/{packet_id}/clients",
                {"Authorization": f"Bearer {issuer.mint(subject=owner, roles=['professional'])}"},
            )
            for owner, packet_id in packets
        ]
        health = [Target("/healthz", {})]
        # The same callers and tokens as the opens, on the route that checks the token and
        # does nothing else: what an authenticated request costs before any work.
        me = [Target("/v1/me", target.headers) for target in opens]
        server = serve(env, port, args.workers)

        def load(phase: str, targets: list[Target], seconds: float, total: int) -> Phase:
            before = cpu_now(server.pid)
            if wrk is not None:
                result = run_wrk(
                    wrk,
                    phase,
                    base,
                    targets,
                    connections=args.concurrency,
                    threads=args.wrk_threads,
                    seconds=seconds,
                )
            else:
                result = run_python(
                    phase, base, targets, concurrency=args.concurrency, total=total, limit_s=seconds
                )
            after = cpu_now(server.pid)
            if before is None or after is None:
                return result
            used = CpuUse(after[0] - before[0], after[1] - before[1])
            return dataclasses.replace(result, cpu=used)

        rounds = []
        try:
            load("warm-up", opens, max(1.0, args.seconds / 5), max(50, args.requests // 10))
            # Alternate the routes, so a neighbour's load hits each about equally.
            for _ in range(args.rounds):
                ceiling = load("GET /healthz", health, args.seconds, args.requests)
                authenticated = load("GET /v1/me", me, args.seconds, args.requests)
                opened = load("GET /v1/packets/{id}/clients", opens, args.seconds, args.requests)
                rounds.append(Round(ceiling, authenticated, opened))
            at_rates = [
                run_at_rate(
                    f"{rate:g} opens/s, fixed rate", base, opens, rate=rate, seconds=args.seconds
                )
                for rate in args.rates
            ]
        finally:
            server.terminate()
            server.wait(timeout=30)
        return rounds, at_rates
    finally:
        shutil.rmtree(home, ignore_errors=True)


def report(label: str, rounds: list[Round], at_rates: list[Phase]) -> None:
    print(f"\n[{label}]  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"  {'route':32} {'req':>7} {'err':>5} {'503':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
    )
    for number, (ceiling, authenticated, opened) in enumerate(rounds, 1):
        for phase in (ceiling, authenticated, opened):
            print(
                f"  {phase.label:32} {phase.requests:7d} {phase.errors:5d} {phase.unavailable:5d} "
                f"{phase.per_second:8.0f} {phase.percentile(50):8.1f} {phase.percentile(99):8.1f}"
            )
        for phase in (ceiling, authenticated, opened):
            if phase.cpu is not None and phase.requests:
                print(
                    f"  {phase.label:32} CPU per request: service "
                    f"{phase.cpu.service_seconds / phase.requests * 1000:.2f} ms, PostgreSQL "
                    f"{phase.cpu.database_seconds / phase.requests * 1000:.2f} ms"
                )
        ratio = opened.per_second / ceiling.per_second if ceiling.per_second else 0.0
        print(
            f"  round {number}: opens/s ÷ healthz/s = {ratio:.2f}× (target ≥ 0.5×); "
            f"open p99 {opened.percentile(99):.1f} ms (target ≤ 25 ms); "
            f"open mean {opened.mean:.1f} ms"
        )
        if authenticated.per_second:
            print(
                f"  round {number}: opens/s ÷ /v1/me/s = "
                f"{opened.per_second / authenticated.per_second:.2f}× (no target; for comparison)"
            )
        if ceiling.cpu is not None and opened.cpu is not None and opened.requests:
            # The same question by CPU: less noisy than throughput when the two phases' 16
            # connections happen to be spread differently over the workers.
            per_open = opened.cpu.service_seconds + opened.cpu.database_seconds
            per_health = ceiling.cpu.service_seconds + ceiling.cpu.database_seconds
            if per_open > 0 and ceiling.requests:
                by_cpu = (per_health / ceiling.requests) / (per_open / opened.requests)
                print(f"  round {number}: healthz CPU ÷ open CPU, per request = {by_cpu:.2f}×")
        if opened.errors:
            print(
                f"  WARNING: {opened.errors} opens did not return 200 ({opened.unavailable} × 503)"
            )
    for phase in at_rates:
        print(
            f"  open at {phase.label}: {phase.requests} requests, {phase.errors} errors, "
            f"p50 {phase.percentile(50):.1f} ms, p99 {phase.percentile(99):.1f} ms "
            f"(from the scheduled send time)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument(
        "--requests", type=int, default=4000, help="requests per phase (Python client only)"
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of phases")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (≥ 16)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--professionals", type=int, default=16, help="packets to open")
    parser.add_argument("--packet-size", type=int, default=20)
    parser.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",") if x],
        default=[25.0, 50.0, 100.0],
        help="fixed request rates (opens/s, comma-separated) for the open-loop latency phases",
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--python-client", action="store_true", help="use the Python client even if wrk exists"
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds, args.professionals, args.rounds = 400, 4.0, 4, 1
        args.rates = [25.0]
    wrk = ensure_wrk(args.python_client)
    print(
        f"packet open benchmark: {args.concurrency} concurrent clients, {args.workers} workers, "
        f"{args.rounds} round(s) of {args.seconds:.0f} s per phase, "
        f"load generator {'wrk' if wrk else 'Python httpx'}, "
        f"{os.cpu_count()} CPUs (the load generator shares them), "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if args.backend in ("sqlite", "both"):
        folder = Path(tempfile.mkdtemp(prefix="cp-bench-sqlite-"))
        try:
            rounds, at_rates = bench_backend(
                "SQLite", f"sqlite:///{folder / 'bench.db'}", args, wrk
            )
            report("SQLite", rounds, at_rates)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if args.backend in ("postgres", "both"):
        created = postgres_database()
        if created is not None:
            url, drop = created
            try:
                report("PostgreSQL", *bench_backend("PostgreSQL", url, args, wrk))
            finally:
                drop()


if __name__ == "__main__":
    main()
