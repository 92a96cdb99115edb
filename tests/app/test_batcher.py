"""The batcher: batching by cost, idle latency, failures, full queues, workers side by side, draining.

Clips reach it as a KServe request's do, through the intake (``tests/app/harness.py``).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from app.batching import BatchPolicy
from app.errors import Closed, InferenceFailed, Overloaded
from app.runtime import Done
from tests.app.harness import FakeModel, Harness, clip, until


def make(model: FakeModel, **kw: object) -> Harness:
    return Harness(model.run, **kw)  # type: ignore[arg-type]


async def held(**kw: object) -> tuple[FakeModel, Harness, asyncio.Future]:  # type: ignore[type-arg]
    """A batcher whose worker is held inside the model on a clip of 1 frame: what is queued now waits.
    Returns the model, the harness and the held request (``model.gate.set()`` lets it go)."""
    model = FakeModel()
    model.gate.clear()
    h = make(model, **kw)
    running = asyncio.ensure_future(h.submit(clip(1)))
    await until(lambda: model.entered == 1)
    return model, h, running


def test_a_lone_request_runs_at_once_and_busy_time_gathers_a_batch() -> None:
    async def main() -> None:
        model = FakeModel()
        h = make(model)
        r = await h.submit(clip(3))
        assert r.probabilities.tolist() == [12.0, 3.0] and r.batch_size == 1
        model.gate.clear()  # the model is busy: the next requests must gather
        first = asyncio.ensure_future(h.submit(clip(1)))
        await until(lambda: model.entered == 2)
        rest = [asyncio.ensure_future(h.submit(clip(n))) for n in (2, 3, 4)]
        await until(lambda: h.depth == 3)
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        assert [r.probabilities[1].item() for r in results] == [1, 2, 3, 4]
        assert model.batches[1:] == [[1], [2, 3, 4]]
        await h.close()  # joins the worker: its batch statistics are all recorded
        assert [s.size for s in h.stats] == [1, 1, 3]

    asyncio.run(main())


def test_batches_respect_the_clip_and_frame_limits() -> None:
    async def main() -> None:
        model, h, first = await held(max_batch_size=3, max_batch_frames=10)  # taken alone while the model was idle
        tasks = [asyncio.ensure_future(h.submit(clip(n))) for n in (4, 4, 4, 1, 1, 1, 1, 12)]
        await until(lambda: h.depth == 8)
        model.gate.set()
        await asyncio.gather(first, *tasks)
        # At most 3 clips and 10 frames a batch; a lone clip over the frame limit still runs.
        assert model.batches == [[1], [4, 4], [4, 1, 1], [1, 1], [12]]
        await h.close()

    asyncio.run(main())


def test_a_failing_batch_fails_only_the_clip_that_caused_it() -> None:
    async def main() -> None:
        model, h, blocker = await held()
        good1, bad, good2 = (asyncio.ensure_future(h.submit(c)) for c in (clip(2), clip(2, 255), clip(3)))
        await until(lambda: h.depth == 3)
        model.gate.set()
        await blocker
        assert (await good1).probabilities[1] == 2 and (await good2).probabilities[1] == 3
        with pytest.raises(InferenceFailed, match="poisoned"):
            await bad
        assert [2, 2, 3] in model.batches and [2] in model.batches and [3] in model.batches
        await h.close()

    asyncio.run(main())


def test_full_queue_is_refused() -> None:
    async def main() -> None:
        model, h, running = await held(max_queue=2)  # taken by the worker; the queue is empty again
        queued = [asyncio.ensure_future(h.submit(clip(1))) for _ in range(2)]
        await until(lambda: h.depth == 2)
        with pytest.raises(Overloaded):
            await h.submit(clip(1))
        model.gate.set()
        await asyncio.gather(running, *queued)
        await h.close()

    asyncio.run(main())


def test_the_after_batch_hook_runs_after_each_batch_and_cannot_stop_the_worker() -> None:
    async def main() -> None:
        calls: list[int] = []

        def hook() -> None:
            calls.append(len(model.batches))  # the batches the model has run by then
            raise RuntimeError("housekeeping failed")

        model = FakeModel()
        h = make(model, after_batch=hook)
        await h.submit(clip(1))
        await until(lambda: calls == [1])
        assert (await h.submit(clip(2))).probabilities.tolist() == [8.0, 2.0]  # the worker survived the hook
        await until(lambda: calls == [1, 2])
        await h.close()

    asyncio.run(main())


def test_several_clips_of_one_request_are_queued_all_or_nothing() -> None:
    async def main() -> None:
        model, h, running = await held(max_queue=4)
        with pytest.raises(Overloaded):
            await h.submit_many([clip(1)] * 5)
        assert h.depth == 0  # nothing of the refused request was queued
        results = asyncio.ensure_future(h.submit_many([clip(n) for n in (1, 2, 3, 4)]))
        await until(lambda: h.depth == 4)
        model.gate.set()
        assert [r.probabilities[1].item() for r in await results] == [1, 2, 3, 4]
        await running
        await h.close()

    asyncio.run(main())


def test_the_worker_survives_a_model_that_returns_the_wrong_rows() -> None:
    async def main() -> None:
        calls = 0

        def broken(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return torch.zeros(len(lengths) + (1 if calls == 1 else 0), 2)

        h = Harness(lambda f, n: Done(broken(f, n)), max_batch_size=4, max_queue=8, timeout_s=5)
        with pytest.raises(InferenceFailed, match="rows"):
            await h.submit(clip(1))
        assert (await h.submit(clip(2))).probabilities.tolist() == [0.0, 0.0]  # still serving
        await h.close()

    asyncio.run(main())


def test_close_answers_everything_accepted_then_refuses() -> None:
    async def main() -> None:
        model = FakeModel(delay_s=0.02)
        h = make(model, max_batch_size=1)
        tasks = [asyncio.ensure_future(h.submit(clip(1, value=i))) for i in range(10)]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(h.close())
        results = await asyncio.gather(*tasks)
        await closing
        assert [r.probabilities[0].item() for r in results] == [4.0 * i for i in range(10)]
        with pytest.raises(Closed):
            await h.submit(clip(1))

    asyncio.run(main())


def test_max_delay_waits_for_a_fuller_batch() -> None:
    async def main() -> None:
        model = FakeModel()
        h = make(model, max_delay_s=1.0, max_batch_size=4)
        first = asyncio.ensure_future(h.submit(clip(1)))
        await asyncio.sleep(0.02)
        rest = [asyncio.ensure_future(h.submit(clip(1))) for _ in range(3)]
        await asyncio.gather(first, *rest)
        assert model.batches == [[1, 1, 1, 1]]
        await h.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_batch_frames", 0),
        ("max_queue", 0),
        ("instances", 0),
        ("share_from", 0),
        ("timeout_s", 0),
        ("max_delay_s", -1),
    ],
)
def test_a_policy_with_bad_limits_is_refused(field: str, value: float) -> None:
    opts: dict[str, float] = {"max_batch_size": 1, "max_batch_frames": 1, "max_queue": 1, "timeout_s": 1, field: value}
    with pytest.raises(ValueError, match=field):
        BatchPolicy(**opts)  # type: ignore[arg-type]


class Deferred:
    """A ``run`` that, like CUDA, only queues the work: the model runs when ``result`` is called."""

    def __init__(self, model: FakeModel, fail_start: bool = False) -> None:
        self.model, self.fail_start = model, fail_start
        self.events: list[str] = []  # "start N" / "wait N", in the worker's order

    def __call__(self, frames: torch.Tensor, lengths: torch.Tensor) -> Deferred.Handle:
        n = len([e for e in self.events if e.startswith("start")])
        self.events.append(f"start {n}")
        if self.fail_start and n == 0:
            raise RuntimeError("could not start")
        return Deferred.Handle(self, n, frames, lengths)

    class Handle:
        ready = False

        def __init__(self, owner: Deferred, n: int, frames: torch.Tensor, lengths: torch.Tensor) -> None:
            self.owner, self.n, self.frames, self.lengths = owner, n, frames, lengths

        def result(self) -> torch.Tensor:
            self.owner.events.append(f"wait {self.n}")
            return self.owner.model(self.frames, self.lengths)


def test_a_batch_only_queued_by_run_lets_the_next_one_start_before_it_is_waited_for() -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate.clear()  # the first wait blocks until the queue holds more work
        deferred = Deferred(model)
        h = Harness(deferred, max_batch_size=2)
        first = asyncio.ensure_future(h.submit(clip(3, 1)))
        await until(lambda: model.entered == 1)
        rest = asyncio.ensure_future(h.submit_many([clip(2, v) for v in (2, 3, 4, 5)]))
        await asyncio.sleep(0.05)  # the worker is still inside the first wait
        model.gate.set()
        r1, results = await first, await rest
        assert r1.probabilities.tolist() == [3.0 * 4, 3.0]
        assert [r.probabilities[0].item() for r in results] == [2 * 4 * v for v in (2, 3, 4, 5)]
        # once work is queued, the next batch is started before the current one is waited for
        assert deferred.events.index("start 2") < deferred.events.index("wait 1"), deferred.events
        assert sum(s.size for s in h.stats) == 5
        await h.close()

    asyncio.run(main())


def test_a_batch_that_fails_to_start_or_to_finish_is_run_clip_by_clip() -> None:
    async def main() -> None:
        model = FakeModel()
        h = Harness(Deferred(model, fail_start=True), max_batch_size=8)
        results = await asyncio.gather(
            h.submit(clip(2, 1)), h.submit(clip(2, 255)), h.submit(clip(2, 3)), return_exceptions=True
        )
        assert not isinstance(results[0], BaseException) and results[0].probabilities[0].item() == 2 * 4 * 1
        assert isinstance(results[1], InferenceFailed)  # fails in its wait: only the poisoned clip fails
        assert not isinstance(results[2], BaseException) and results[2].probabilities[0].item() == 2 * 4 * 3
        again = await h.submit(clip(1, 7))  # the worker is alive
        assert again.probabilities[0].item() == 4 * 7
        await h.close()

    asyncio.run(main())


def test_several_workers_run_batches_side_by_side_and_drain_on_close() -> None:
    class Overlapping(FakeModel):
        def __init__(self) -> None:
            super().__init__(delay_s=0.05)
            self.running = self.most = 0
            self.lock = threading.Lock()

        def __call__(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                return super().__call__(frames, lengths)
            finally:
                with self.lock:
                    self.running -= 1

    async def main() -> None:
        model = Overlapping()
        h = make(model, max_batch_size=1, instances=2)
        results = await asyncio.gather(*(h.submit(clip(2, v)) for v in range(1, 7)))
        assert [r.probabilities[0].item() for r in results] == [2 * 4 * v for v in range(1, 7)]
        assert model.most == 2  # two forward passes at once, never more
        late = [asyncio.ensure_future(h.submit(clip(1, 9))) for _ in range(3)]
        await until(lambda: model.entered >= 7)
        await h.close()  # answers what it accepted, then both workers stop
        assert [r.probabilities[0].item() for r in await asyncio.gather(*late)] == [4 * 9] * 3
        assert sum(s.size for s in h.stats) == 9

    asyncio.run(main())


def test_a_second_worker_starts_beside_a_busy_one_only_once_share_from_clips_wait() -> None:
    async def main() -> None:
        model = FakeModel()
        h = make(model, instances=2, share_from=3)
        model.gate.clear()  # the first batch holds its worker
        first = asyncio.ensure_future(h.submit(clip(1, 1)))
        await until(lambda: model.entered == 1)
        waiting = [asyncio.ensure_future(h.submit(clip(1, v))) for v in (2, 3)]
        await until(lambda: h.depth == 2)
        await asyncio.sleep(0.05)
        assert model.entered == 1 and h.depth == 2  # two clips: the idle worker leaves them to gather
        waiting.append(asyncio.ensure_future(h.submit(clip(1, 4))))
        await until(lambda: model.entered == 2)  # three wait: the second worker takes all three
        assert h.depth == 0
        model.gate.set()
        results = await asyncio.gather(first, *waiting)
        assert [r.batch_size for r in results] == [1, 3, 3, 3]
        assert sorted(s.size for s in h.stats) == [1, 3]
        # both idle again: a lone clip runs at once, whatever share_from says
        assert (await h.submit(clip(1, 5))).batch_size == 1
        await h.close()

    asyncio.run(main())


@pytest.mark.parametrize(("share_from", "sizes"), [(1, [1, 3, 3]), (2, [1, 6])])
def test_with_share_from_1_the_idle_workers_split_what_waits(share_from: int, sizes: list[int]) -> None:
    async def main() -> None:
        model = FakeModel()
        h = make(model, instances=3, share_from=share_from, max_batch_size=32)
        model.gate.clear()  # every batch holds its worker until the gate opens
        first = asyncio.ensure_future(h.submit(clip(1, 1)))
        await until(lambda: model.entered == 1)
        six = asyncio.ensure_future(h.submit_many([clip(1, v) for v in range(2, 8)]))  # queued at once
        await until(lambda: model.entered == len(sizes) and h.depth == 0)
        model.gate.set()
        await asyncio.gather(first, six)
        # share_from 1: two idle workers take three clips each; otherwise the first to wake takes all six
        assert sorted(s.size for s in h.stats) == sizes
        await h.close()

    asyncio.run(main())
