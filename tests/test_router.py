"""Router over real RankWorkers (tiny engine): placement, affinity, abort, rank loss and reset_ranks."""

from __future__ import annotations

import asyncio

import pytest

from cluster.rank_server import RankWorker
from cluster.router import RankError, Router
from comm import wire
from engine.core.engine import EngineConfig, LLMEngine
from scheduler.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = [0, *range(5, 25)]
SECRET = b"router-test-launch-secret"


def _engine(ckpt) -> LLMEngine:
    return LLMEngine(ckpt, EngineConfig(cache_budget_bytes=32 * 2**20, max_num_seqs=8))


@pytest.fixture(scope="module")
def workers(tiny_ckpt):
    ws = [RankWorker(_engine(tiny_ckpt), "127.0.0.1", 0, rank=r, secret=SECRET).start() for r in range(2)]
    yield ws
    for w in ws:
        w.stop()


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """Greedy tokens for PROMPT straight from an engine."""
    e = _engine(tiny_ckpt)
    e.add_request(PROMPT, GREEDY, "ref")
    toks: list[int] = []
    while not e.idle():
        for o in e.step():
            toks += o.new_token_ids
    return toks


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _collect(stream):
    toks, last = [], None
    async for out in stream:
        toks += out.new_token_ids
        last = out
    return toks, last.finish_reason


def test_streams_greedy_tokens_and_stats(workers, reference):
    async def main():
        router = await Router([w.address for w in workers], secret=SECRET).start()
        try:
            a = router.submit(PROMPT, GREEDY, "a")
            b = router.submit(PROMPT, GREEDY, "b")
            assert {a.rank, b.rank} == {0, 1}  # least outstanding tokens: the second goes to the idle rank
            ra, rb = await asyncio.gather(_collect(a), _collect(b))
            stats = await router.stats()
            return ra, rb, stats, router.loads()
        finally:
            await router.close()

    ra, rb, stats, loads = run(main())
    assert ra == rb == (reference, "length")
    assert [s["rank"] for s in stats] == [0, 1] and all(s["connected"] for s in stats)
    assert all("pages_free" in s["engine"] for s in stats)
    assert loads == [0, 0]


def test_prefix_affinity_and_overload(workers):
    async def main():
        router = await Router([w.address for w in workers], secret=SECRET, affinity_tokens=8,
                              affinity_slack_tokens=0).start()
        try:
            shared = PROMPT[:8]
            first = router.submit(shared + [30, 31], GREEDY, "p1")
            other = router.submit([0, 40, 41, 42, 43, 44, 45, 46, 47], GREEDY, "o1")
            loads = [router.loads()]
            again = router.submit(shared + [50, 51, 52], GREEDY, "p2")  # p1's rank: load 16 <= 2 * 15
            loads.append(router.loads())
            third = router.submit(shared + [60], GREEDY, "p3")  # p1's rank now 33 > 2 * 15: overloaded
            ranks = (first.rank, other.rank, again.rank, third.rank)
            await asyncio.gather(*(_collect(s) for s in (first, other, again, third)))
            return ranks, loads
        finally:
            await router.close()

    (r1, r2, r3, r4), loads = run(main())
    assert loads[0] == [16, 15] if r1 == 0 else [15, 16]
    assert r1 != r2
    assert r3 == r1  # shared first page: same rank while not overloaded
    assert r4 == r2  # overloaded: least outstanding tokens wins


def test_closing_a_stream_aborts_on_the_rank(workers):
    async def main():
        router = await Router([w.address for w in workers[:1]], secret=SECRET).start()
        try:
            stream = router.submit(PROMPT, SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True), "long")
            first = await stream.__anext__()
            await stream.aclose()
            for _ in range(200):
                (s,) = await router.stats()
                if s["engine"]["running"] == 0 and s["engine"]["live_requests"] == 0 and s["inflight"] == 0:
                    return first, s
                await asyncio.sleep(0.05)
            raise AssertionError(f"request still running on the rank: {s}")
        finally:
            await router.close()

    first, s = run(main())
    assert first.new_token_ids and not first.finished
    assert s["inflight"] == 0


def test_rank_refusal_is_a_rank_error(workers, monkeypatch):
    async def main():
        router = await Router([w.address for w in workers[:1]], secret=SECRET).start()
        try:
            with pytest.raises(RankError) as e:
                await _collect(router.submit([0, 100_000], GREEDY, "oob"))
            assert e.value.refused and "out of range" in str(e.value)
            with pytest.raises(ValueError, match="empty prompt"):
                router.submit([], GREEDY)
            monkeypatch.setattr(wire, "MAX_FRAME_BYTES", 1000)
            with pytest.raises(wire.WireError, match="exceeds the limit"):
                router.submit([1] * 1000, GREEDY, "huge")
            assert router.loads() == [0] and router.abort("huge") is False  # nothing left behind
        finally:
            await router.close()

    run(main())


def test_lost_rank_fails_its_requests_without_hold(tiny_ckpt):
    async def main():
        w = RankWorker(_engine(tiny_ckpt), "127.0.0.1", 0, secret=SECRET).start()
        router = await Router([w.address], secret=SECRET).start()
        try:
            stream = router.submit(PROMPT, SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True))
            await stream.__anext__()
            await asyncio.to_thread(w.stop)
            with pytest.raises(RankError, match="lost"):
                await _collect(stream)
            with pytest.raises(RankError, match="no rank"):
                router.submit(PROMPT, GREEDY)
        finally:
            await router.close()

    run(main())


def test_reset_ranks_resumes_greedy_requests_unchanged(tiny_ckpt, reference):
    async def main():
        w0 = RankWorker(_engine(tiny_ckpt), "127.0.0.1", 0, secret=SECRET).start()
        router = await Router([w0.address], secret=SECRET, hold_on_loss=True).start()
        w1 = None
        try:
            stream = router.submit(PROMPT, GREEDY, "resume")
            toks = list((await stream.__anext__()).new_token_ids)
            toks += (await stream.__anext__()).new_token_ids
            await asyncio.to_thread(w0.stop)  # the rank group dies mid-request
            for _ in range(100):
                if not router.clients[0].connected:
                    break
                await asyncio.sleep(0.02)
            late = router.submit(PROMPT, GREEDY, "late")  # arrives while no rank is up: waits for the reset
            w1 = RankWorker(_engine(tiny_ckpt), "127.0.0.1", 0, secret=SECRET).start()
            await router.reset_ranks([w1.address])
            rest, reason = await _collect(stream)
            assert await _collect(late) == (reference, "length")
            return toks + rest, reason, router.generation
        finally:
            await router.close()
            if w1 is not None:
                w1.stop()

    toks, reason, generation = run(main())
    assert (toks, reason) == (reference, "length")
    assert generation == 1
