"""The intake: both deadlines, withdrawal when a request ends, decoding admission, failures reported
from a decode thread, and no request outliving itself in a reference cycle.

The decode threads are ``ManualDecoders`` here (``tests/app/harness.py``): the test ends each
upload's decoding when, where and how it wants. tests/e2e/test_decoding.py runs the same paths on
a real server with real decode threads and processes.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from concurrent.futures import CancelledError

import pytest

from app.errors import BadInput, ClientGone, DecoderFailed, Overloaded, TimedOut
from tests.app.harness import FakeModel, Harness, clip, pixels, until


async def held(**kw: object) -> tuple[FakeModel, Harness, asyncio.Future]:  # type: ignore[type-arg]
    """A harness whose worker is held inside the model on a clip of 1 frame: what is queued now waits."""
    model = FakeModel()
    model.gate.clear()
    h = Harness(model.run, **kw)  # type: ignore[arg-type]
    running = asyncio.ensure_future(h.submit(clip(1)))
    await until(lambda: model.entered == 1)
    return model, h, running


def test_timed_out_and_withdrawn_clips_are_dropped_before_compute() -> None:
    async def main() -> None:
        model, h, running = await held(timeout_s=0.2)
        late = asyncio.ensure_future(h.submit(clip(5)))
        gone = asyncio.ensure_future(h.submit(clip(6)))
        await until(lambda: h.depth == 2)
        gone.cancel()  # the caller went away
        with pytest.raises(TimedOut):
            await late
        model.gate.set()
        # The running clip outlived the deadline inside the model, not in the queue: it is answered.
        assert (await running).probabilities[1] == 1
        await h.close()  # the worker drains the queue (dropping both) and stops
        assert model.batches == [[1]]
        assert sorted(h.drops) == ["cancelled", "cancelled"]

    asyncio.run(main())


def test_a_request_of_several_clips_times_out_once_and_leaves_no_unretrieved_errors() -> None:
    async def main() -> None:
        reported: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        model, h, running = await held(timeout_s=0.2)
        with pytest.raises(TimedOut):  # the deadline's timer fails every clip of the request still queued
            await h.submit_many([clip(2), clip(3), clip(4)])
        model.gate.set()
        await running
        await h.close()
        assert model.batches == [[1]]  # none of the three reached the model
        assert h.drops == ["cancelled"] * 3
        gc.collect()  # a future whose exception nobody retrieved is reported when it is collected
        await asyncio.sleep(0)
        assert reported == []

    asyncio.run(main())


def test_a_clip_decoded_on_another_thread_times_out_by_its_time_in_the_queue_not_before() -> None:
    async def main() -> None:
        model, h, running = await held(timeout_s=0.3)  # the worker is busy: what is queued now waits
        waiting = asyncio.ensure_future(h.classify())
        await asyncio.sleep(0.45)  # "decoding" for longer than the queue's timeout: not time in the queue
        assert not waiting.done()
        queued_at = time.monotonic()
        await asyncio.to_thread(h.decoders.finish, 0, pixels(2))  # as a decode thread does
        with pytest.raises(TimedOut, match="in the queue"):
            await waiting
        assert time.monotonic() - queued_at >= 0.25
        model.gate.set()
        await running
        await h.close()
        assert model.batches == [[1]] and h.drops == ["cancelled"]

    asyncio.run(main())


def test_a_clip_never_decoded_times_out_after_the_decode_limit_and_is_never_run() -> None:
    async def main() -> None:
        model = FakeModel()
        h = Harness(model.run, decode_timeout_s=0.2)  # the queue's limit stays 10 s
        began = time.monotonic()
        with pytest.raises(TimedOut, match=r"not decoded within 0\.2 s"):
            await h.classify()  # no decoder ever finishes it: a hung one
        assert 0.19 <= time.monotonic() - began < 5
        assert h.decoders.cancelled == [0]  # a job still waiting for a decode process would be withdrawn
        assert h.decoders.skip(0)  # and a decode thread that takes it now skips it
        await asyncio.to_thread(h.decoders.finish, 0, pixels(2))  # the hung decoder finishes after all
        assert (await h.submit(clip(1))).probabilities.tolist() == [4.0, 1.0]
        await h.close()
        assert model.batches == [[1]] and h.drops == ["cancelled"]  # the late clip cost no compute

    asyncio.run(main())


def test_a_decode_failure_reported_from_another_thread_reaches_the_waiter() -> None:
    async def main() -> None:
        h = Harness(FakeModel().run)
        waiting = asyncio.ensure_future(h.classify())
        await until(lambda: len(h.decoders.jobs) == 1)
        await asyncio.to_thread(h.decoders.finish, 0, BadInput("frame 3 is not a decodable image"))
        with pytest.raises(BadInput, match="frame 3"):
            await waiting
        assert (await h.submit(clip(2))).probabilities.tolist() == [8.0, 2.0]  # still serving
        await h.close()

    asyncio.run(main())


def test_an_upload_is_answered_with_the_time_it_was_queued() -> None:
    async def main() -> None:
        h = Harness(FakeModel().run)
        started = time.perf_counter()
        waiting = asyncio.ensure_future(h.classify())
        await until(lambda: len(h.decoders.jobs) == 1)
        await asyncio.to_thread(h.decoders.finish, 0, pixels(3, 2))
        answer = await waiting
        assert answer.result.probabilities.tolist() == [24.0, 3.0] and answer.result.frames == 3
        assert started < answer.queued_at < time.perf_counter()
        await h.close()

    asyncio.run(main())


def test_uploads_waiting_to_be_decoded_are_bounded_by_the_queue_limit_and_come_back() -> None:
    async def main() -> None:
        h = Harness(FakeModel().run, max_queue=2)
        waiting = [asyncio.ensure_future(h.classify()) for _ in range(2)]
        await until(lambda: len(h.decoders.jobs) == 2)
        with pytest.raises(Overloaded, match="2 uploads waiting to be decoded"):
            await h.classify()
        await asyncio.to_thread(h.decoders.finish, 0, BadInput("not an image"))  # a failed decode frees its slot
        await asyncio.to_thread(h.decoders.finish, 1, pixels(1))
        with pytest.raises(BadInput):
            await waiting[0]
        assert (await waiting[1]).result.frames == 1
        third = asyncio.ensure_future(h.classify())  # both slots are back
        await until(lambda: len(h.decoders.jobs) == 3)
        await asyncio.to_thread(h.decoders.finish, 2, pixels(1))
        assert (await third).result.frames == 1
        await h.close()

    asyncio.run(main())


def test_a_timeline_or_explanation_holds_an_upload_place_while_it_runs() -> None:
    async def main() -> None:
        h = Harness(FakeModel().run, max_queue=2)
        waiting = asyncio.ensure_future(h.classify())
        await until(lambda: len(h.decoders.jobs) == 1)
        with h.intake.holding(h.served):  # type: ignore[arg-type]
            with pytest.raises(Overloaded, match="2 uploads waiting to be decoded"):
                await h.classify()  # one upload and one job: full
            with pytest.raises(Overloaded), h.intake.holding(h.served):  # type: ignore[arg-type]
                pass
        with h.intake.holding(h.served):  # type: ignore[arg-type]  # the job's place came back
            pass
        await asyncio.to_thread(h.decoders.finish, 0, pixels(1))
        assert (await waiting).result.frames == 1
        await h.close()

    asyncio.run(main())


def test_an_upload_whose_client_left_is_withdrawn_and_not_decoded() -> None:
    async def main() -> None:
        h = Harness(FakeModel().run)
        left = asyncio.Event()
        waiting = asyncio.ensure_future(h.classify(left.wait))
        await until(lambda: len(h.decoders.jobs) == 1)
        assert not h.decoders.skip(0)
        left.set()  # the client disconnects before its upload is decoded
        with pytest.raises(ClientGone):
            await waiting
        assert h.decoders.skip(0) and h.decoders.cancelled == [0]
        await asyncio.to_thread(h.decoders.finish, 0, CancelledError())  # the thread skips it
        assert h.drops == ["undecoded"]
        await h.close()

    asyncio.run(main())


def test_an_answered_request_leaves_no_cycle_holding_its_clip() -> None:
    """Its decoded frames are freed when the request ends, not when Python's cyclic collector next runs:
    a deadline timer that re-armed itself through a closure kept hundreds of clips alive under load."""

    async def main() -> None:
        model = FakeModel()
        h = Harness(model.run, timeout_s=0.05)
        answered = clip(2)
        alive = [weakref.ref(answered)]
        await h.submit(answered)
        del answered
        # a timer that re-arms: the clip is queued after the first check, then waits out its deadline
        model.gate.clear()
        running = asyncio.ensure_future(h.submit(clip(1)))  # holds the worker inside the model
        await until(lambda: model.entered == 1)
        waiting = asyncio.ensure_future(h.classify())
        await asyncio.sleep(0.03)
        late = pixels(3)
        alive.append(weakref.ref(late))
        h.decoders.finish(0, late)
        del late
        h.decoders.jobs.clear()
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
        # the worker drops the timed-out clip from its queue, and with it the last reference (no collector runs)
        await until(lambda: h.depth == 0 and alive[1]() is None, timeout=5)
        assert [ref() is None for ref in alive] == [True, True]
        await h.close()

    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()


def test_a_decode_stopped_while_its_request_goes_on_answers_503_not_silence() -> None:
    async def main() -> None:
        h = Harness(FakeModel().run)
        waiting = asyncio.ensure_future(h.classify())
        await until(lambda: len(h.decoders.jobs) == 1)
        await asyncio.to_thread(h.decoders.finish, 0, CancelledError())  # stopped, though nobody withdrew it
        with pytest.raises(DecoderFailed, match="stopped"):
            await asyncio.wait_for(waiting, 5)
        assert h.drops == []
        await h.close()

    asyncio.run(main())
