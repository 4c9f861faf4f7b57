"""Scale-out test: two respserve replicas on one fresh PostgreSQL schema, many clients, one replica killed.

Each client runs 3-turn `previous_response_id` chains whose turns alternate between the replicas, and
background jobs started on one replica and resumed by streaming from the other
(`GET /v1/responses/{id}?stream=true&starting_after=N`). Halfway through, replica A gets `kill -9`; the
clients go on against B. Then it reports:

- requests sent, and 5xx from the survivor (goal 0);
- completed responses retrievable from the survivor afterwards (goal 100%);
- of the responses A left unfinished, those still `in_progress` 30 s after the kill (goal 0);
- store latency: `GET /v1/responses/{id}` timed under load (while both replicas served, and after the
  kill) and idle, against the same load on two SQLite replicas for as long as both PostgreSQL ones served
  (each its own file; clients pinned to one, since SQLite replicas share nothing).

Replies are kept to nothing (a chain turn's first token is forced to be the end token) so that the run
measures the store, not the model; background jobs run `--job-tokens` tokens so that some are in flight
when A dies. No model text is read.

    python scripts/scale_test.py                                  # 100 clients, 60 s, then 30 s on SQLite
    python scripts/scale_test.py --clients 10 --seconds 10 --sqlite-seconds 0 --lease-seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import POSTGRES_URL, fresh_schema  # noqa: E402
from scale_load import LoadRun, Tally, percentile, start_replicas  # noqa: E402

STARTED = time.monotonic()


@dataclass
class Report:
    tally: Tally
    survivor_5xx: int
    retrievable: int
    stuck: int  # of A's unfinished responses, those still in progress 30 s after the kill
    settled_after_s: float | None  # seconds from the kill until none of them was
    orphans: Counter[str]  # their stored statuses after the run
    left_after_run: int  # any started response still in progress 30 s after the load ended
    idle_ms: list[float]

    @property
    def passed(self) -> bool:
        finished = len(self.tally.finished)
        settled = self.stuck == 0 and self.left_after_run == 0
        return self.survivor_5xx == 0 and finished > 0 and self.retrievable == finished and settled


async def check_postgres(store_url: str, data_root: Path, args: argparse.Namespace) -> Report:
    """The run on PostgreSQL: load, kill -9 of A, then what the survivor B still knows."""
    replicas = start_replicas(2, data_root, "--store", store_url, "--lease-seconds", str(args.lease_seconds))
    progress("PostgreSQL replicas up")
    try:
        run = LoadRun(replicas, job_tokens=args.job_tokens, job_share=args.job_share, alternate=True)
        await run.drive(args.clients, args.seconds, kill_after_s=args.seconds * args.kill_at)
        progress("load done")
        survivor = replicas[1]
        loop = asyncio.get_running_loop()
        left_after_run, _ = await run.settled(survivor, set(run.tally.started), loop.time(), within_s=30.0)
        progress("settled")
        statuses = await run.statuses(survivor, set(run.tally.finished))
        retrievable = sum(statuses.get(id_) == status for id_, status in run.tally.finished.items())
        orphans = Counter(str(status) for status in (await run.statuses(survivor, set(run.dead_left))).values())
        idle = await run.idle_latency(survivor, list(run.tally.finished), count=200)
        survivor_5xx = sum(n for (name, code), n in run.tally.statuses.items() if name == survivor.name and code >= 500)
        assert run.dead_stuck is not None, "replica A was not killed"
        return Report(
            tally=run.tally,
            survivor_5xx=survivor_5xx,
            retrievable=retrievable,
            stuck=run.dead_stuck,
            settled_after_s=run.dead_settled_after_s,
            orphans=orphans,
            left_after_run=left_after_run,
            idle_ms=idle,
        )
    finally:
        for replica in replicas:
            replica.stop()


async def check_sqlite(data_root: Path, args: argparse.Namespace) -> tuple[Tally, list[float]]:
    """The same load on two SQLite replicas, no kill: the store latency to compare with."""
    replicas = start_replicas(2, data_root)
    progress("SQLite replicas up")
    try:
        run = LoadRun(replicas, job_tokens=args.job_tokens, job_share=args.job_share, alternate=False)
        await run.drive(args.clients, args.sqlite_seconds, kill_after_s=None)
        idle = await run.idle_latency(replicas[1], run.finished_on(replicas[1]), count=200)
        return run.tally, idle
    finally:
        for replica in replicas:
            replica.stop()


def progress(what: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {what}", file=sys.stderr, flush=True)


def latency(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {percentile(values, 50):.1f} ms, p99 {percentile(values, 99):.1f} ms (n={len(values)})"


def print_report(report: Report, args: argparse.Namespace, sqlite: tuple[Tally, list[float]] | None) -> None:
    tally = report.tally
    print(
        f"2 replicas on one PostgreSQL schema, {args.clients} clients for {args.seconds:g} s; "
        f"replica A killed (SIGKILL) at {args.seconds * args.kill_at:g} s"
    )
    print(f"  requests sent: {tally.requests}")
    for key, count in sorted(tally.counts.items()):
        print(f"    {key}: {count}")
    for (name, code), count in sorted(tally.statuses.items()):
        print(f"    HTTP {code} from {name}: {count}")
    for (name, error), count in sorted(tally.errors.items()):
        print(f"    {error} from {name}: {count}")
    print(f"  5xx from the survivor: {report.survivor_5xx} (goal 0)")
    finished = len(tally.finished)
    share = report.retrievable / finished if finished else 0.0
    print(f"  completed responses retrievable from the survivor: {report.retrievable} of {finished} ({share:.1%})")
    left = ", ".join(f"{count} {status}" for status, count in sorted(report.orphans.items())) or "none"
    print(f"  responses A left unfinished when killed: {sum(report.orphans.values())}; now stored as: {left}")
    after = report.settled_after_s
    settled = f"; none left {after:.1f} s after the kill" if after is not None else ""
    print(f"    of those, still in_progress 30 s after the kill: {report.stuck} (goal 0){settled}")
    print(f"  any started response in_progress 30 s after the load ended: {report.left_after_run}")
    print("  store latency, GET /v1/responses/{id} from the other replica, under load:")
    print(f"    PostgreSQL, both replicas up: {latency(tally.store_ms)}")
    print(f"    PostgreSQL, after the kill:   {latency(tally.store_ms_after_kill)}")
    if sqlite:
        load = f"{sqlite[0].requests} requests in {args.sqlite_seconds:g} s"
        print(f"    SQLite, both replicas up:     {latency(sqlite[0].store_ms)} ({load})")
    print("  store latency, idle (sequential GETs of stored responses):")
    print(f"    PostgreSQL: {latency(report.idle_ms)}")
    if sqlite:
        print(f"    SQLite:     {latency(sqlite[1])}")
    print("PASS" if report.passed else "FAIL")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of --seconds after which A is killed")
    # As long as both PostgreSQL replicas served, by default: the latencies compared are of the same load.
    parser.add_argument("--sqlite-seconds", type=float, default=30, help="the SQLite comparison run; 0: none")
    parser.add_argument("--lease-seconds", type=float, default=15, help="the replicas' lease (their default: 15)")
    parser.add_argument("--job-share", type=float, default=0.3, help="share of chains followed by a background job")
    parser.add_argument("--job-tokens", type=int, default=32, help="output tokens of a background job")
    parser.add_argument("--postgres", default=POSTGRES_URL, help="server and database for the fresh schema")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="respserve-scale-") as root,
        fresh_schema(args.postgres, "respserve_scale") as store,
    ):
        report = asyncio.run(check_postgres(store, Path(root) / "postgres", args))
        sqlite = asyncio.run(check_sqlite(Path(root) / "sqlite", args)) if args.sqlite_seconds > 0 else None
    print_report(report, args, sqlite)
    if args.json:
        figures = {
            "args": {key: str(value) for key, value in vars(args).items()},
            "requests": report.tally.requests,
            "survivor_5xx": report.survivor_5xx,
            "finished": len(report.tally.finished),
            "retrievable": report.retrievable,
            "stuck": report.stuck,
            "settled_after_s": report.settled_after_s,
            "left_by_the_killed_replica": dict(report.orphans),
            "left_after_run": report.left_after_run,
            "postgres_store_ms": {
                "load": report.tally.store_ms,
                "after_kill": report.tally.store_ms_after_kill,
                "idle": report.idle_ms,
            },
            "sqlite_store_ms": {"load": sqlite[0].store_ms, "idle": sqlite[1]} if sqlite else None,
        }
        args.json.write_text(json.dumps(figures))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
