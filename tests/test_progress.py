"""semcache.progress: log lines on an injected clock, ETA arithmetic, silence for short work,
rich bars on a recording console; and the thread tuner bulk imports use."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest
from rich.console import Console

from semcache.clock import FakeClock
from semcache.errors import InvalidInputError
from semcache.progress import Progress, bars, eta_seconds, format_duration, rate_per_second
from semcache.threads import ThreadTuner


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="semcache")
    return caplog


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "semcache"]


def test_eta_is_what_is_left_at_the_average_rate() -> None:
    assert eta_seconds(250, 1000, 10.0) == pytest.approx(30.0)  # 25/s, 750 left
    assert eta_seconds(1000, 1000, 40.0) == 0.0
    assert eta_seconds(1200, 1000, 40.0) == 0.0  # past the total: nothing left
    assert eta_seconds(0, 1000, 5.0) is None  # no rate yet
    assert eta_seconds(10, None, 5.0) is None  # unknown total
    assert rate_per_second(50, 2.0) == 25.0
    assert rate_per_second(50, 0.0) is None


def test_durations_read_as_people_write_them() -> None:
    assert format_duration(7.4) == "7s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3720) == "1h02m"
    assert format_duration(-3) == "0s"


def test_long_work_logs_count_rate_and_eta_at_most_every_few_seconds(
    records: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(0)
    with Progress("rebuilding the index of /x", total=1000, unit="entries", clock=clock) as p:
        for _ in range(10):  # 100 entries a second for 10 s
            clock.advance(1)
            p.advance(100)
    lines = messages(records)
    # quiet for the first 2 s, then one line per 5 s at most, then the closing line
    assert lines == [
        "rebuilding the index of /x: 200/1,000 entries (20%), 100 entries/s, ETA 8s",
        "rebuilding the index of /x: 700/1,000 entries (70%), 100 entries/s, ETA 3s",
        "rebuilding the index of /x: done, 1,000/1,000 entries (100%) in 10s (100 entries/s)",
    ]
    assert all(r.levelno == logging.INFO for r in records.records)


def test_short_work_says_nothing(records: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0)
    with Progress("rebuilding the index of /x", total=10_000, unit="entries", clock=clock) as p:
        for _ in range(100):
            clock.advance(0.019)  # 1.9 s in all: under the quiet period
            p.advance(100)
    assert messages(records) == []


def test_unknown_total_reports_counts_and_rate_without_eta(
    records: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(0)
    with Progress("re-embedding /x", unit="prompts", clock=clock, quiet=1, every=1) as p:
        clock.advance(2)
        p.advance(64)
    assert messages(records)[0] == "re-embedding /x: 64 prompts, 32 prompts/s"


def test_work_that_fails_says_where_it_stopped(records: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0)
    work = Progress("importing", total=100, unit="lines", clock=clock)
    with pytest.raises(RuntimeError), work as p:
        clock.advance(3)
        p.advance(40)
        raise RuntimeError("disk full")
    assert (
        messages(records)[-1]
        == "importing: stopped (RuntimeError), 40/100 lines (40%) in 3s (13 lines/s)"
    )


def test_update_sets_the_count_and_the_total() -> None:
    clock = FakeClock(0)
    with Progress("embedding", clock=clock) as p:
        p.update(30, total=120)
        clock.advance(3)
        p.update(60)
        assert (p.done, p.total) == (60, 120)
        assert p.eta() == pytest.approx(3.0)


def test_inside_bars_progress_draws_a_rich_bar_instead_of_logging(
    records: pytest.LogCaptureFixture,
) -> None:
    console = Console(record=True, width=120, force_terminal=False)
    clock = FakeClock(0)
    with bars(console):
        with Progress("importing", total=7, unit="lines", clock=clock, quiet=0, every=0) as p:
            for _ in range(7):
                clock.advance(10)
                p.advance()
        with Progress("scanning", unit="rows") as q:  # no total: count only
            q.advance(5)
    text = console.export_text()
    assert "importing" in text and "7/7" in text and "lines" in text
    assert "ETA" in text and "0:00:00" in text
    assert "scanning" in text and "5/?" in text
    assert messages(records) == []  # the bar replaced the log lines
    # outside the block, Progress logs again
    with Progress("later", total=1, clock=clock, quiet=0) as p:
        clock.advance(1)
        p.advance()
    assert messages(records)[0].startswith("later: 1/1 items")


def test_bars_take_progress_from_other_threads_and_nest() -> None:
    console = Console(record=True, width=120, force_terminal=False)
    with bars(console), bars(Console(record=True)):  # nested: the outer display is reused

        def work() -> None:
            with Progress("rebuilding", total=3, unit="entries") as p:
                p.advance(3)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    text = console.export_text()
    assert "rebuilding" in text and "3/3 entries" in text


def test_the_rich_bar_shows_a_running_eta() -> None:
    """Mid-way, the bar's ETA is what is left at the measured speed, not a blank or 0:00:00."""
    from semcache import progress

    console = Console(record=True, width=120, force_terminal=False)
    with bars(console), Progress("replay", total=1000, unit="lookups") as p:
        p.advance(10)
        time.sleep(0.3)
        p.advance(90)
        display = progress._SINKS[-1].display
        remaining = display.tasks[0].time_remaining
        frame = Console(record=True, width=120, force_terminal=False)
        frame.print(display.get_renderable())
    assert remaining is not None and remaining > 0
    row = frame.export_text()
    assert "100/1000 lookups" in row
    eta = re.search(r"ETA (\d+:\d\d:\d\d)", row)
    assert eta is not None and eta.group(1) != "0:00:00", row


def test_the_thread_tuner_tries_each_count_then_keeps_the_faster() -> None:
    tuner = ThreadTuner([2, 1], trials=2, recheck_every=10)
    speed = {1: 200.0, 2: 100.0}  # lines/s: one thread wins (a busy host)
    picks = []
    for _ in range(20):
        threads = tuner.next()
        picks.append(threads)
        tuner.record(threads, 1000, 1000 / speed[threads])
    # trials 1,2,1,2 then the faster for the rest of the period; trials again at batch 10
    assert picks[:4] == [1, 2, 1, 2] and set(picks[4:10]) == {1}
    assert picks[10:14] == [1, 2, 1, 2] and set(picks[14:]) == {1}
    assert tuner.rate(1) == pytest.approx(200.0)


def test_the_thread_tuner_follows_a_change_of_load() -> None:
    tuner = ThreadTuner([1, 2], trials=1, recheck_every=5)
    speed = {1: 200.0, 2: 100.0}
    for batch in range(15):
        if batch == 5:
            speed = {1: 100.0, 2: 300.0}  # the host went quiet: two threads win now
        threads = tuner.next()
        tuner.record(threads, 1000, 1000 / speed[threads])
    assert tuner.best() == 2
    assert ThreadTuner([4]).next() == 4  # one candidate: no trials
    with pytest.raises(InvalidInputError):
        ThreadTuner([0, 1])
    with pytest.raises(InvalidInputError):
        ThreadTuner([1, 2], trials=3, recheck_every=4)


def test_bars_without_work_print_nothing_and_empty_work_gets_no_row() -> None:
    console = Console(record=True, width=80, force_terminal=False)
    with bars(console):
        pass
    assert console.export_text() == ""  # a command's stderr stays clean when nothing ran
    with bars(console), Progress("rebuilding the index of /x", total=0, unit="entries"):
        pass
    assert console.export_text() == ""
    with bars(console), Progress("importing", total=100_000, unit="lines") as p:
        p.advance(100_000)
    row = console.export_text()
    assert "100000/100000 lines" in row and "ETA 0:00:00" in row  # whole at 80 columns
