"""The CPU's intra-op threads shared among forward passes that run at the same time (app.threads)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from app.threads import CpuThreads


@pytest.fixture
def keep_torch_threads() -> Iterator[int]:
    """CpuThreads changes this thread's torch threads and the default of threads started later: restore both."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def where() -> tuple[str, int]:
    return threading.current_thread().name, torch.get_num_threads()


def two_passes(budget: CpuThreads) -> dict[str, tuple[str, int]]:
    """A first pass that runs alone, and a second that starts while the first still runs: where each ran."""
    first_in, second_done = threading.Event(), threading.Event()
    seen: dict[str, tuple[str, int]] = {}

    def first_pass() -> None:
        seen["first"] = where()
        first_in.set()
        assert second_done.wait(10)

    def second_pass() -> None:
        seen["second"] = where()

    def second() -> None:
        assert first_in.wait(10)
        budget.run(second_pass)
        second_done.set()

    threads = [
        threading.Thread(target=budget.run, args=(first_pass,), name="first"),
        threading.Thread(target=second, name="second"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return seen


def test_a_pass_alone_runs_on_the_wide_lane_with_every_thread_and_others_wait_for_it_then_share(
    keep_torch_threads: int,
) -> None:
    budget = CpuThreads(4)
    assert budget.wide_lane and torch.get_num_threads() == 1  # the thread that made it drops to one
    wide_in, release_wide, narrow_in, release_narrow = (threading.Event() for _ in range(4))
    seen: dict[str, tuple[str, int]] = {}

    def wide_pass() -> None:
        seen["wide"] = where()
        wide_in.set()
        assert release_wide.wait(10)

    def narrow_pass(name: str) -> None:
        seen[name] = where()
        narrow_in.set()
        assert release_narrow.wait(10)

    try:
        first = threading.Thread(target=budget.run, args=(wide_pass,))
        first.start()
        assert wide_in.wait(10)
        others = [threading.Thread(target=budget.run, args=(narrow_pass, n), name=n) for n in ("second", "third")]
        for t in others:
            t.start()
        # both wait for the pass on every thread rather than run beside it
        deadline = time.monotonic() + 10
        while budget.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert budget.waiting == 2 and not narrow_in.is_set() and "second" not in seen and "third" not in seen
        release_wide.set()
        first.join(10)
        deadline = time.monotonic() + 10
        while not {"second", "third"} <= seen.keys() and time.monotonic() < deadline:
            time.sleep(0.01)  # both inside at once: neither is let go before the other has started
        assert narrow_in.is_set()
        release_narrow.set()
        for t in others:
            t.join(10)
        # then they run side by side on their own threads, half the threads each
        assert seen == {"wide": ("torch-wide_0", 4), "second": ("second", 2), "third": ("third", 2)}
        assert budget.run(where) == ("torch-wide_0", 4)  # all finished: alone again, on the lane
        # the lane's count stays its own while other threads set theirs
        torch.set_num_threads(1)
        assert budget.run(where) == ("torch-wide_0", 4)
    finally:
        budget.close()
    assert CpuThreads(1).total == 1 and not CpuThreads(1).wide_lane and CpuThreads(0).total == 1


def test_with_the_wide_lane_threads_started_later_run_torch_on_one_thread_until_it_closes(
    keep_torch_threads: int,
) -> None:
    def in_a_fresh_thread() -> int:
        seen: list[int] = []
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        fresh.start()
        fresh.join(10)
        return seen[0]

    budget = CpuThreads(3)
    assert in_a_fresh_thread() == 1
    budget.close()
    assert not budget.wide_lane and in_a_fresh_thread() == 3


def test_without_the_wide_lane_each_pass_runs_on_its_caller_at_its_share(keep_torch_threads: int) -> None:
    budget = CpuThreads(4, wide_lane=False)
    assert not budget.wide_lane
    assert two_passes(budget) == {"first": ("first", 4), "second": ("second", 2)}
    assert budget.run(where) == (threading.current_thread().name, 4)


def test_without_the_wide_lane_the_default_for_threads_started_later_is_left_at_the_total(
    keep_torch_threads: int,
) -> None:
    before = keep_torch_threads
    budget = CpuThreads(before, wide_lane=False)
    other_in, release = threading.Event(), threading.Event()

    def hold() -> None:
        other_in.set()
        release.wait(10)

    holder = threading.Thread(target=budget.run, args=(hold,))
    holder.start()
    assert other_in.wait(10)
    assert budget.run(torch.get_num_threads) == max(1, before // 2)
    release.set()
    holder.join(10)
    seen: list[int] = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join(10)
    assert seen == [before]


def test_a_narrow_pass_runs_on_its_caller_on_one_thread_with_or_without_the_lane(keep_torch_threads: int) -> None:
    for lane in (True, False):
        budget = CpuThreads(2, wide_lane=lane)
        try:
            name, threads = budget.run_narrow(where)
            assert name == threading.current_thread().name and threads == 1, lane
            assert budget.run(where)[1] == 2  # a pass that is not narrow still gets every thread alone
        finally:
            budget.close()
