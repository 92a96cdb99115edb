"""The batcher on its own: batching by cost, idle latency, failures, timeouts, cancellation, draining."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable

import pytest
import torch

from app.batcher import Batcher, BatchStats, Closed, InferenceFailed, Overloaded, Result, TimedOut


class FakeModel:
    """Sums each clip's pixels; records batches; can be slowed down or poisoned (a clip of 255s raises)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = 0  # forward calls started (the worker may be waiting at the gate)

    def __call__(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.entered += 1
        self.gate.wait()
        self.batches.append(lengths.tolist())
        clips = frames.split(lengths.tolist())
        if any(bool((c == 255).all()) for c in clips):
            raise RuntimeError("poisoned clip")
        time.sleep(self.delay_s)
        return torch.stack([torch.tensor([float(c.sum()), float(len(c))]) for c in clips])


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition the worker thread brings about, instead of guessing a sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def clip(frames: int, value: int = 1) -> torch.Tensor:
    return torch.full((frames, 1, 2, 2), value, dtype=torch.uint8)


def make(model: FakeModel, **kw: object) -> tuple[Batcher, list[BatchStats], list[str]]:
    stats: list[BatchStats] = []
    drops: list[str] = []
    opts = {"max_batch_size": 8, "max_batch_frames": 100, "max_delay_s": 0.0, "max_queue": 64, "timeout_s": 10.0}
    opts.update(kw)
    b = Batcher("m", model, on_batch=stats.append, on_drop=drops.append, **opts)  # type: ignore[arg-type]
    b.start()
    return b, stats, drops


async def held(**kw: object) -> tuple[FakeModel, Batcher, list[str], asyncio.Future[Result]]:
    """A batcher (``make``) whose worker is held inside the model on a clip of 1 frame: what is queued now
    waits. Returns the model, the batcher, its drops and the held request (``model.gate.set()`` lets it go)."""
    model = FakeModel()
    model.gate.clear()
    b, _, drops = make(model, **kw)
    running = asyncio.ensure_future(b.submit(clip(1)))
    await until(lambda: model.entered == 1)
    return model, b, drops, running


def test_a_lone_request_runs_at_once_and_busy_time_gathers_a_batch() -> None:
    async def main() -> None:
        model = FakeModel()
        b, stats, _ = make(model)
        r = await b.submit(clip(3))
        assert r.probabilities.tolist() == [12.0, 3.0] and r.batch_size == 1
        model.gate.clear()  # the model is busy: the next requests must gather
        first = asyncio.ensure_future(b.submit(clip(1)))
        await until(lambda: model.entered == 2)
        rest = [asyncio.ensure_future(b.submit(clip(n))) for n in (2, 3, 4)]
        await until(lambda: b.depth == 3)
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        assert [r.probabilities[1].item() for r in results] == [1, 2, 3, 4]
        assert model.batches[1:] == [[1], [2, 3, 4]]
        await b.close()  # joins the worker: its batch statistics are all recorded
        assert [s.size for s in stats] == [1, 1, 3]

    asyncio.run(main())


def test_batches_respect_the_clip_and_frame_limits() -> None:
    async def main() -> None:
        model, b, _, first = await held(max_batch_size=3, max_batch_frames=10)  # taken alone while the model was idle
        tasks = [asyncio.ensure_future(b.submit(clip(n))) for n in (4, 4, 4, 1, 1, 1, 1, 12)]
        await until(lambda: b.depth == 8)
        model.gate.set()
        await asyncio.gather(first, *tasks)
        # At most 3 clips and 10 frames a batch; a lone clip over the frame limit still runs.
        assert model.batches == [[1], [4, 4], [4, 1, 1], [1, 1], [12]]
        await b.close()

    asyncio.run(main())


def test_a_failing_batch_fails_only_the_clip_that_caused_it() -> None:
    async def main() -> None:
        model, b, _, blocker = await held()
        good1, bad, good2 = (asyncio.ensure_future(b.submit(c)) for c in (clip(2), clip(2, 255), clip(3)))
        await until(lambda: b.depth == 3)
        model.gate.set()
        await blocker
        assert (await good1).probabilities[1] == 2 and (await good2).probabilities[1] == 3
        with pytest.raises(InferenceFailed, match="poisoned"):
            await bad
        assert [2, 2, 3] in model.batches and [2] in model.batches and [3] in model.batches
        await b.close()

    asyncio.run(main())


def test_full_queue_is_refused() -> None:
    async def main() -> None:
        model, b, _, running = await held(max_queue=2)  # taken by the worker; the queue is empty again
        queued = [asyncio.ensure_future(b.submit(clip(1))) for _ in range(2)]
        await until(lambda: b.depth == 2)
        with pytest.raises(Overloaded):
            await b.submit(clip(1))
        model.gate.set()
        await asyncio.gather(running, *queued)
        await b.close()

    asyncio.run(main())


def test_timed_out_and_cancelled_clips_are_dropped_before_compute() -> None:
    async def main() -> None:
        model, b, drops, running = await held(timeout_s=0.2)
        late = asyncio.ensure_future(b.submit(clip(5)))
        gone = asyncio.ensure_future(b.submit(clip(6)))
        await until(lambda: b.depth == 2)
        gone.cancel()  # the caller went away
        with pytest.raises(TimedOut):
            await late
        model.gate.set()
        # The running clip outlived the deadline inside the model, not in the queue: it is answered.
        assert (await running).probabilities[1] == 1
        await b.close()  # the worker drains the queue (dropping both) and stops
        assert model.batches == [[1]]
        assert sorted(drops) == ["cancelled", "cancelled"]

    asyncio.run(main())


def test_a_request_of_several_clips_times_out_once_and_leaves_no_unretrieved_errors() -> None:
    async def main() -> None:
        reported: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        model, b, drops, running = await held(timeout_s=0.2)
        with pytest.raises(TimedOut):  # the deadline's timer fails every clip of the request still queued
            await b.submit_many([clip(2), clip(3), clip(4)])
        model.gate.set()
        await running
        await b.close()
        assert model.batches == [[1]]  # none of the three reached the model
        assert drops == ["cancelled"] * 3
        gc.collect()  # a future whose exception nobody retrieved is reported when it is collected
        await asyncio.sleep(0)
        assert reported == []

    asyncio.run(main())


def test_a_clip_queued_from_another_thread_times_out_by_its_time_in_the_queue_not_before() -> None:
    async def main() -> None:
        model, b, drops, running = await held(timeout_s=0.3)  # the worker is busy: what is queued now waits
        tickets = b.tickets(1, asyncio.get_running_loop())
        waiting = asyncio.ensure_future(b.wait(tickets))
        await asyncio.sleep(0.45)  # "decoding" for longer than the timeout: not time in the queue
        assert not waiting.done()
        queued_at = time.monotonic()
        await asyncio.to_thread(b.enqueue, tickets, [clip(2)])  # as a decode thread does
        with pytest.raises(TimedOut):
            await waiting
        assert time.monotonic() - queued_at >= 0.25
        model.gate.set()
        await running
        await b.close()
        assert model.batches == [[1]] and drops == ["cancelled"]

    asyncio.run(main())


def test_a_clip_never_decoded_gets_timed_out_after_the_decode_limit_and_is_never_run() -> None:
    async def main() -> None:
        model = FakeModel()
        b, _, drops = make(model, decode_timeout_s=0.2)  # the queue limit stays 10 s
        tickets = b.tickets(1, asyncio.get_running_loop())
        began = time.monotonic()
        with pytest.raises(TimedOut, match=r"not decoded within 0\.2 s"):
            await b.wait(tickets)  # no decoder ever queues it: a hung one
        assert 0.19 <= time.monotonic() - began < 5
        await asyncio.to_thread(b.enqueue, tickets, [clip(2)])  # the hung decoder finishes after all
        assert (await b.submit(clip(1))).probabilities.tolist() == [4.0, 1.0]
        await b.close()
        assert model.batches == [[1]] and drops == ["cancelled"]  # the late clip cost no compute

    asyncio.run(main())


def test_a_failure_reported_from_another_thread_reaches_the_waiter() -> None:
    async def main() -> None:
        b, _, _ = make(FakeModel())
        tickets = b.tickets(2, asyncio.get_running_loop())
        waiting = asyncio.ensure_future(b.wait(tickets))
        await asyncio.to_thread(b.fail, tickets, ValueError("frame 3 is not a decodable image"))
        with pytest.raises(ValueError, match="frame 3"):
            await waiting
        assert (await b.submit(clip(2))).probabilities.tolist() == [8.0, 2.0]  # still serving
        await b.close()

    asyncio.run(main())


def test_the_after_batch_hook_runs_after_each_batch_and_cannot_stop_the_worker() -> None:
    async def main() -> None:
        calls: list[int] = []

        def hook() -> None:
            calls.append(len(model.batches))  # the batches the model has run by then
            raise RuntimeError("housekeeping failed")

        model = FakeModel()
        b, _, _ = make(model, after_batch=hook)
        await b.submit(clip(1))
        await until(lambda: calls == [1])
        assert (await b.submit(clip(2))).probabilities.tolist() == [8.0, 2.0]  # the worker survived the hook
        await until(lambda: calls == [1, 2])
        await b.close()

    asyncio.run(main())


def test_submit_many_is_all_or_nothing() -> None:
    async def main() -> None:
        model, b, _, running = await held(max_queue=4)
        with pytest.raises(Overloaded):
            await b.submit_many([clip(1)] * 5)
        assert b.depth == 0  # nothing of the refused request was queued
        results = asyncio.ensure_future(b.submit_many([clip(n) for n in (1, 2, 3, 4)]))
        await until(lambda: b.depth == 4)
        model.gate.set()
        assert [r.probabilities[1].item() for r in await results] == [1, 2, 3, 4]
        await running
        await b.close()

    asyncio.run(main())


def test_the_worker_survives_a_model_that_returns_the_wrong_rows() -> None:
    async def main() -> None:
        calls = 0

        def broken(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return torch.zeros(len(lengths) + (1 if calls == 1 else 0), 2)

        b = Batcher("m", broken, max_batch_size=4, max_batch_frames=100, max_delay_s=0, max_queue=8, timeout_s=5)
        b.start()
        with pytest.raises(InferenceFailed, match="rows"):
            await b.submit(clip(1))
        assert (await b.submit(clip(2))).probabilities.tolist() == [0.0, 0.0]  # still serving
        await b.close()

    asyncio.run(main())


def test_close_answers_everything_accepted_then_refuses() -> None:
    async def main() -> None:
        model = FakeModel(delay_s=0.02)
        b, _, _ = make(model, max_batch_size=1)
        tasks = [asyncio.ensure_future(b.submit(clip(1, value=i))) for i in range(10)]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(b.close())
        results = await asyncio.gather(*tasks)
        await closing
        assert [r.probabilities[0].item() for r in results] == [4.0 * i for i in range(10)]
        with pytest.raises(Closed):
            await b.submit(clip(1))

    asyncio.run(main())


def test_max_delay_waits_for_a_fuller_batch() -> None:
    async def main() -> None:
        model = FakeModel()
        b, _, _ = make(model, max_delay_s=1.0, max_batch_size=4)
        first = asyncio.ensure_future(b.submit(clip(1)))
        await asyncio.sleep(0.02)
        rest = [asyncio.ensure_future(b.submit(clip(1))) for _ in range(3)]
        await asyncio.gather(first, *rest)
        assert model.batches == [[1, 1, 1, 1]]
        await b.close()

    asyncio.run(main())


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        Batcher("m", FakeModel(), max_batch_size=0, max_batch_frames=1, max_delay_s=0, max_queue=1, timeout_s=1)


class Deferred:
    """A ``launch`` that, like CUDA, only queues the work: the model runs when ``wait`` is called."""

    def __init__(self, model: FakeModel, fail_launch: bool = False) -> None:
        self.model, self.fail_launch = model, fail_launch
        self.events: list[str] = []  # "launch N" / "wait N", in the worker's order

    def __call__(self, frames: torch.Tensor, lengths: torch.Tensor) -> Deferred.Handle:
        n = len([e for e in self.events if e.startswith("launch")])
        self.events.append(f"launch {n}")
        if self.fail_launch and n == 0:
            raise RuntimeError("could not start")
        return Deferred.Handle(self, n, frames, lengths)

    class Handle:
        def __init__(self, owner: Deferred, n: int, frames: torch.Tensor, lengths: torch.Tensor) -> None:
            self.owner, self.n, self.frames, self.lengths = owner, n, frames, lengths

        def wait(self) -> torch.Tensor:
            self.owner.events.append(f"wait {self.n}")
            return self.owner.model(self.frames, self.lengths)


def make_pipelined(model: FakeModel, launch: Deferred, **kw: object) -> tuple[Batcher, list[BatchStats]]:
    stats: list[BatchStats] = []
    opts = {"max_batch_size": 2, "max_batch_frames": 100, "max_delay_s": 0.0, "max_queue": 64, "timeout_s": 10.0}
    opts.update(kw)
    b = Batcher("m", model, on_batch=stats.append, launch=launch, **opts)  # type: ignore[arg-type]
    b.start()
    return b, stats


def test_with_launch_the_next_batch_starts_before_the_current_one_is_waited_for() -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate.clear()  # the first wait blocks until the queue holds more work
        launch = Deferred(model)
        b, stats = make_pipelined(model, launch)
        first = asyncio.ensure_future(b.submit(clip(3, 1)))
        await until(lambda: model.entered == 1)
        rest = asyncio.ensure_future(b.submit_many([clip(2, v) for v in (2, 3, 4, 5)]))
        await asyncio.sleep(0.05)  # the worker is still inside the first wait
        model.gate.set()
        r1, results = await first, await rest
        assert r1.probabilities.tolist() == [3.0 * 4, 3.0]
        assert [r.probabilities[0].item() for r in results] == [2 * 4 * v for v in (2, 3, 4, 5)]
        # once work is queued, the next batch is launched before the current one is waited for
        assert launch.events.index("launch 2") < launch.events.index("wait 1"), launch.events
        assert sum(s.size for s in stats) == 5
        await b.close()

    asyncio.run(main())


def test_with_launch_failures_fall_back_to_clip_by_clip() -> None:
    async def main() -> None:
        model = FakeModel()
        launch = Deferred(model, fail_launch=True)
        b, _ = make_pipelined(model, launch, max_batch_size=8)
        results = await asyncio.gather(
            b.submit(clip(2, 1)), b.submit(clip(2, 255)), b.submit(clip(2, 3)), return_exceptions=True
        )
        assert not isinstance(results[0], BaseException) and results[0].probabilities[0].item() == 2 * 4 * 1
        assert isinstance(results[1], InferenceFailed)  # fails in wait: only the poisoned clip fails
        assert not isinstance(results[2], BaseException) and results[2].probabilities[0].item() == 2 * 4 * 3
        again = await b.submit(clip(1, 7))  # the worker is alive
        assert again.probabilities[0].item() == 4 * 7
        await b.close()

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
        b, stats, _ = make(model, max_batch_size=1, workers=2)
        assert b.workers == 2
        results = await asyncio.gather(*(b.submit(clip(2, v)) for v in range(1, 7)))
        assert [r.probabilities[0].item() for r in results] == [2 * 4 * v for v in range(1, 7)]
        assert model.most == 2  # two forward passes at once, never more
        late = [asyncio.ensure_future(b.submit(clip(1, 9))) for _ in range(3)]
        await until(lambda: model.entered >= 7)
        await b.close()  # answers what it accepted, then both workers stop
        assert [r.probabilities[0].item() for r in await asyncio.gather(*late)] == [4 * 9] * 3
        assert sum(s.size for s in stats) == 9

    asyncio.run(main())


def test_a_second_worker_starts_beside_a_busy_one_only_once_share_from_clips_wait() -> None:
    async def main() -> None:
        model = FakeModel()
        b, stats, _ = make(model, workers=2, share_from=3)
        model.gate.clear()  # the first batch holds its worker
        first = asyncio.ensure_future(b.submit(clip(1, 1)))
        await until(lambda: model.entered == 1)
        waiting = [asyncio.ensure_future(b.submit(clip(1, v))) for v in (2, 3)]
        await until(lambda: b.depth == 2)
        await asyncio.sleep(0.05)
        assert model.entered == 1 and b.depth == 2  # two clips: the idle worker leaves them to gather
        waiting.append(asyncio.ensure_future(b.submit(clip(1, 4))))
        await until(lambda: model.entered == 2)  # three wait: the second worker takes all three
        assert b.depth == 0
        model.gate.set()
        results = await asyncio.gather(first, *waiting)
        assert [r.batch_size for r in results] == [1, 3, 3, 3]
        assert sorted(s.size for s in stats) == [1, 3]
        # both idle again: a lone clip runs at once, whatever share_from says
        assert (await b.submit(clip(1, 5))).batch_size == 1
        await b.close()

    asyncio.run(main())


@pytest.mark.parametrize(("share_from", "sizes"), [(1, [1, 3, 3]), (2, [1, 6])])
def test_with_share_from_1_the_idle_workers_split_what_waits(share_from: int, sizes: list[int]) -> None:
    async def main() -> None:
        model = FakeModel()
        b, stats, _ = make(model, workers=3, share_from=share_from, max_batch_size=32)
        model.gate.clear()  # every batch holds its worker until the gate opens
        first = asyncio.ensure_future(b.submit(clip(1, 1)))
        await until(lambda: model.entered == 1)
        six = asyncio.ensure_future(b.submit_many([clip(1, v) for v in range(2, 8)]))  # queued at once
        await until(lambda: model.entered == len(sizes) and b.depth == 0)
        model.gate.set()
        await asyncio.gather(first, six)
        # share_from 1: two idle workers take three clips each; otherwise the first to wake takes all six
        assert sorted(s.size for s in stats) == sizes
        await b.close()

    asyncio.run(main())


def test_share_from_must_be_positive() -> None:
    with pytest.raises(ValueError, match="share_from"):
        Batcher(
            "m",
            FakeModel(),
            max_batch_size=1,
            max_batch_frames=1,
            max_delay_s=0,
            max_queue=1,
            timeout_s=1,
            share_from=0,
        )


def test_an_answered_request_leaves_no_cycle_holding_its_clip() -> None:
    """Its decoded frames are freed when the request ends, not when Python's cyclic collector next runs:
    a deadline timer that re-armed itself through a closure kept hundreds of clips alive under load."""

    async def main() -> None:
        model = FakeModel()
        b, _, _ = make(model, timeout_s=0.05)
        answered = clip(2)
        alive = [weakref.ref(answered)]
        await b.submit(answered)
        del answered
        # a timer that re-arms: the clip is queued after the first check, then waits out its deadline
        model.gate.clear()
        running = asyncio.ensure_future(b.submit(clip(1)))  # holds the worker inside the model
        await until(lambda: model.entered == 1)
        tickets = b.tickets(1, asyncio.get_running_loop())
        late = clip(3)
        alive.append(weakref.ref(late))
        waiting = asyncio.ensure_future(b.wait(tickets))
        await asyncio.sleep(0.03)
        b.enqueue(tickets, [late])
        del late, tickets
        try:
            await waiting
        except TimedOut:
            pass
        else:
            raise AssertionError("the late clip should have waited out its deadline")
        del waiting
        model.gate.set()
        await running
        del running
        await until(lambda: b.depth == 0)  # the worker has dropped the timed-out clip from its queue
        assert [ref() is None for ref in alive] == [True, True]
        await b.close()

    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()
