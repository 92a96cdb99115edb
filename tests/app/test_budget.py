"""The server-wide memory budget (app.budget) on its own; tests/e2e/test_hostile.py fills it over sockets."""

from __future__ import annotations

import threading
from pathlib import Path

from app.budget import MemoryBudget, memory_limit


def test_reservations_fit_the_budget_or_take_nothing() -> None:
    budget = MemoryBudget(100)
    assert budget.reserve(60) and not budget.reserve(41) and budget.used == 60
    assert budget.reserve(30) and budget.nearly_spent
    budget.release(60)
    assert budget.used == 30 and not budget.nearly_spent


def test_reservations_from_many_threads_never_overshoot() -> None:
    budget = MemoryBudget(1000)
    taken: list[int] = []

    def grab() -> None:
        for _ in range(200):
            if budget.reserve(7):
                taken.append(7)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.used == sum(taken) <= 1000 and budget.used > 1000 - 7


def test_the_memory_limit_is_the_machines_or_the_cgroups() -> None:
    meminfo = Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]
    assert 1 << 26 <= memory_limit() <= int(meminfo) * 1024
