"""The scale-out test (scripts/scale_test.py), short: 10 clients for 10 s over two replicas on one
PostgreSQL schema, replica A killed (`kill -9`) halfway. The survivor must answer no 5xx, still hold every
response a client saw complete, and leave nothing in progress."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import scale_test  # noqa: E402


def test_two_replicas_lose_nothing_when_one_is_killed_under_load(tmp_path: Path, postgres_url: str) -> None:
    args = scale_test.parse_args(
        ["--clients", "10", "--seconds", "10", "--lease-seconds", "2", "--job-share", "0.5", "--sqlite-seconds", "0"]
    )
    report = asyncio.run(scale_test.check_postgres(postgres_url, tmp_path, args))
    scale_test.print_report(report, args, sqlite=None)  # shown with -s, and on failure
    tally = report.tally

    assert report.survivor_5xx == 0
    assert not [error for (name, error) in tally.errors if name == "B"]  # the survivor never dropped a connection
    assert tally.finished and report.retrievable == len(tally.finished)
    assert report.stuck == 0 and report.settled_after_s is not None  # A's leftovers, 30 s after the kill
    assert report.left_after_run == 0
    assert set(report.orphans) <= {"failed", "completed", "incomplete", "cancelled"}
    # The load did cross replicas: chains continued and jobs were resumed on the other one, and A was
    # serving when it was killed.
    assert tally.counts["chains completed"] > 0
    assert tally.counts["job streams resumed on another replica"] > 0
    assert tally.counts["resumed streams out of order"] == 0
    assert tally.statuses[("A", 200)] > 0 and tally.statuses[("B", 200)] > 0
