"""Scheduler policy, driven by hand: schedule() -> fabricated ModelRunnerOutput -> update_from_output()."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.config import SchedulerConfig
from scheduler.output import ModelRunnerOutput, SchedulerOutput
from scheduler.request import Request, RequestOutput, RequestStatus
from scheduler.sampling import SamplingParams
from scheduler.scheduler import Scheduler

ROOT = Path(__file__).resolve().parents[1]
EOS = 1


def make(num_pages: int = 64, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(num_pages=num_pages, **kw))


def req(req_id: str, n: int | list[int], max_tokens: int = 100, **sp) -> Request:
    tokens = list(range(1000, 1000 + n)) if isinstance(n, int) else n
    return Request(req_id, tokens, SamplingParams(max_tokens=max_tokens, **sp), eos_token_id=EOS)


def runner_output(s: Scheduler, out: SchedulerOutput, token=7) -> ModelRunnerOutput:
    """Sample `token` (or token(req_id)) for every request whose scheduled tokens reach its end."""
    ids = list(out.num_scheduled_tokens)
    sampled = []
    for req_id in ids:
        r = s.requests[req_id]
        done = r.num_computed_tokens + out.num_scheduled_tokens[req_id] >= r.num_tokens
        sampled.append([token(req_id) if callable(token) else token] if done else [])
    return ModelRunnerOutput(ids, sampled)


def step(s: Scheduler, token=7) -> tuple[SchedulerOutput, list[RequestOutput]]:
    out = s.schedule()
    return out, s.update_from_output(out, runner_output(s, out, token))


# ---------------------------------------------------------------- purity and validation
def test_scheduler_package_imports_no_torch_or_ray():
    mods = [f"scheduler.{p.stem}" for p in sorted((ROOT / "scheduler").glob("*.py")) if p.stem != "__init__"]
    code = f"import sys\nfor m in {mods!r}: __import__(m)\nprint(sorted({{'torch', 'ray'}} & set(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout
    assert {"scheduler.scheduler", "scheduler.pages", "scheduler.request", "scheduler.config"} <= set(mods)


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"num_pages": 0}, "num_pages"),
        ({"num_pages": 4, "max_num_seqs": 0}, "max_num_seqs"),
        ({"num_pages": 4, "max_num_batched_tokens": -1}, "max_num_batched_tokens"),
        ({"num_pages": 4, "page_tokens": 2.5}, "page_tokens"),
        ({"num_pages": 4, "max_model_len": True}, "max_model_len"),
        ({"num_pages": 4, "enable_prefix_caching": 1}, "enable_prefix_caching"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SchedulerConfig.{field} "):
        SchedulerConfig(**kw)


def test_add_request_validation():
    s = make(num_pages=4, page_tokens=16, max_model_len=100)
    s.add_request(req("a", 5))
    with pytest.raises(ValueError, match="duplicate req_id"):
        s.add_request(req("a", 5))
    with pytest.raises(ValueError, match="empty prompt"):
        s.add_request(req("b", 0))
    with pytest.raises(ValueError, match="longer than max_model_len"):
        s.add_request(req("c", 101))
    with pytest.raises(ValueError, match="needs 5 pages"):
        s.add_request(req("d", 65))
    s.add_request(req("e", 64))  # exactly the whole cache: fine
    assert s.num_waiting == 2


# ---------------------------------------------------------------- budget, chunking, order
def test_token_budget_limits_a_step():
    s = make(max_num_batched_tokens=256, page_tokens=16)
    for i in range(3):
        s.add_request(req(f"r{i}", 100))
    out, deltas = step(s)
    assert out.num_scheduled_tokens == {"r0": 100, "r1": 100, "r2": 56}
    assert out.total_num_scheduled_tokens == 256
    assert [d.req_id for d in deltas] == ["r0", "r1"]  # r2's chunk did not reach its end
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"r0": 1, "r1": 1, "r2": 44}


def test_chunked_prefill_then_decode():
    s = make(max_num_batched_tokens=256, page_tokens=256)
    s.add_request(req("a", 1000, max_tokens=3))
    chunks, snaps = [], []
    for _ in range(4):
        out, deltas = step(s)
        chunks.append(out.num_scheduled_tokens["a"])
        snaps.append(list(out.pages_to_snapshot))
    assert chunks == [256, 256, 256, 232]
    assert deltas[0].new_token_ids == [7]  # sampled only once the prompt was complete
    pages = s.requests["a"].page_ids
    assert snaps == [[pages[0]], [pages[1]], [pages[2]], []]  # page 3 holds 232 of 256 tokens
    assert len(out.cached_reqs.req_ids) == 1 and out.cached_reqs.num_computed_tokens == [768]
    out, deltas = step(s)
    assert out.num_scheduled_tokens == {"a": 1} and deltas[0].new_token_ids == [7]
    out, deltas = step(s)
    assert deltas[0].finished and deltas[0].finish_reason == "length"
    assert s.requests == {} and s.pages.num_free == s.config.num_pages


def test_running_decodes_go_before_waiting_prefills():
    s = make(max_num_batched_tokens=100, page_tokens=16)
    s.add_request(req("a", 10))
    step(s)
    s.add_request(req("b", 500))
    out, _ = step(s)
    assert list(out.num_scheduled_tokens) == ["a", "b"]
    assert out.num_scheduled_tokens == {"a": 1, "b": 99}
    assert [n.req_id for n in out.new_reqs] == ["b"] and out.cached_reqs.req_ids == ["a"]


def test_max_num_seqs():
    s = make(max_num_seqs=2, page_tokens=16)
    for i in range(3):
        s.add_request(req(f"r{i}", 8, max_tokens=2))
    out, _ = step(s)
    assert set(out.num_scheduled_tokens) == {"r0", "r1"} and s.num_running == 2 and s.num_waiting == 1
    out, deltas = step(s)  # r0, r1 finish
    assert {d.req_id for d in deltas if d.finished} == {"r0", "r1"}
    out, _ = step(s)
    assert [n.req_id for n in out.new_reqs] == ["r2"] and out.finished_req_ids == {"r0", "r1"}


def test_new_and_cached_request_data():
    s = make(page_tokens=4)
    s.add_request(req("a", 6))
    out, _ = step(s)
    (new,) = out.new_reqs
    assert new.page_ids == [0, 1] and new.num_computed_tokens == 0 and new.output_token_ids == []
    assert new.page_ids is not s.requests["a"].page_ids  # a copy: the scheduler keeps appending
    for expect_new in ([], [], [2], [], []):  # 7, 8, then the 9th token needs a third page
        out, _ = step(s)
        assert out.cached_reqs.new_page_ids == [expect_new]
    assert s.requests["a"].page_ids == [0, 1, 2]


# ---------------------------------------------------------------- preemption
def test_preemption_takes_the_last_admitted_first():
    s = make(num_pages=3, page_tokens=4, enable_prefix_caching=False)
    s.add_request(req("a", 3))
    s.add_request(req("b", 4))
    s.add_request(req("c", 4))
    step(s, token=lambda r: {"a": 11, "b": 12, "c": 13}[r])
    out, _ = step(s)  # b needs a second page: c (admitted last) gives its page up
    assert out.preempted_req_ids == {"c"} and set(out.num_scheduled_tokens) == {"a", "b"}
    c = s.requests["c"]
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.page_ids == []
    assert c.output_token_ids == [13] and c.num_preemptions == 1 and s.waiting[0] is c
    assert not out.new_reqs  # nothing is admitted in a step that preempted
    out, _ = step(s)  # a needs a page now: b goes, then a itself would be next
    assert out.preempted_req_ids == {"b"} and list(s.waiting) == [s.requests["b"], c]
    assert s.stats()["preemptions"] == 2


def test_request_preempts_itself_when_it_is_the_last():
    s = make(num_pages=3, page_tokens=4, enable_prefix_caching=False)
    s.add_request(req("a", 7))
    s.add_request(req("b", 4))
    step(s)
    out, _ = step(s)  # a fits its second page; b, the last admitted, needs a page and goes itself
    assert out.preempted_req_ids == {"b"} and out.num_scheduled_tokens == {"a": 1}
    # Alone, a may grow to the whole cache (3 pages = 12 tokens) and then stops with "length".
    finished = []
    while not finished:
        out, deltas = step(s)
        assert not out.new_reqs
        finished = [d for d in deltas if d.finished]
    assert finished[0].req_id == "a" and finished[0].finish_reason == "length"
    out, _ = step(s)
    assert out.new_reqs[0].req_id == "b" and out.new_reqs[0].output_token_ids == [7]
    assert out.num_scheduled_tokens == {"b": 5}


def test_preempted_request_resumes_with_its_outputs_and_a_prefix_hit():
    s = make(num_pages=4, page_tokens=4)
    s.add_request(req("a", 2, max_tokens=2))
    s.add_request(req("b", 4, max_tokens=2))
    s.add_request(req("c", list(range(2000, 2008))))  # shares no page with b
    step(s, token=lambda r: 40 if r == "c" else 7)
    out, deltas = step(s)  # b needs a page: c goes; its tail page is evicted, its head page stays cached
    assert out.preempted_req_ids == {"c"}
    assert {d.req_id for d in deltas if d.finished} == {"a", "b"}
    out, _ = step(s)
    (new,) = out.new_reqs
    assert new.req_id == "c" and new.output_token_ids == [40] and new.num_sampled_before == 1
    assert new.num_computed_tokens == 4 and out.num_scheduled_tokens["c"] == 5  # 9 tokens, 4 from cache
    assert s.requests["c"].num_cached_tokens == 4


# ---------------------------------------------------------------- abort
def test_abort_waiting_and_running_frees_everything():
    s = make(num_pages=8, page_tokens=4, max_num_seqs=1)
    s.add_request(req("run", 10))
    s.add_request(req("wait", 10))
    step(s)
    assert s.pages.num_free == 5
    assert s.abort_request("run") and s.abort_request("wait") and not s.abort_request("nope")
    assert s.pages.num_free == 8 and s.num_running == 0 and s.num_waiting == 0
    assert s.has_unfinished()  # the runner still has to hear about it
    out, deltas = step(s)
    assert out.finished_req_ids == {"run", "wait"} and out.is_empty
    assert [(d.req_id, d.finished, d.finish_reason) for d in deltas] == [
        ("run", True, "abort"),
        ("wait", True, "abort"),
    ]
    assert not s.has_unfinished() and step(s)[1] == []  # reported once


def test_abort_between_schedule_and_update():
    s = make(page_tokens=4)
    s.add_request(req("a", 5))
    out = s.schedule()
    runner_out = runner_output(s, out)
    s.abort_request("a")
    deltas = s.update_from_output(out, runner_out)
    assert [(d.req_id, d.finish_reason) for d in deltas] == [("a", "abort")]
    assert s.pages.num_free == s.config.num_pages


def test_runner_output_must_match_the_schedule():
    s = make(page_tokens=4)
    s.add_request(req("a", 3))
    s.add_request(req("b", 3))
    out = s.schedule()
    with pytest.raises(RuntimeError, match="2 scheduled"):
        s.update_from_output(out, ModelRunnerOutput(["a"], [[7]]))
    with pytest.raises(RuntimeError, match="not scheduled"):
        s.update_from_output(out, ModelRunnerOutput(["a", "zz"], [[7], [7]]))


# ---------------------------------------------------------------- stop conditions
@pytest.mark.parametrize(
    "sp, tokens, n_out, reason, stop_id",
    [
        ({}, [5, EOS, 6], 2, "stop", None),
        ({"ignore_eos": True, "max_tokens": 3}, [5, EOS, 6], 3, "length", None),
        ({"stop_token_ids": (9,)}, [5, 9, 6], 2, "stop", 9),
        ({"max_tokens": 2}, [5, 6, 7], 2, "length", None),
    ],
)
def test_stop_conditions(sp, tokens, n_out, reason, stop_id):
    s = make(page_tokens=4)
    s.add_request(req("a", 3, **{"max_tokens": 100, **sp}))
    seen = []
    for tok in tokens:
        _, deltas = step(s, token=tok)
        seen += deltas
        if deltas[-1].finished:
            break
    r_out = [t for d in seen for t in d.new_token_ids]
    assert len(r_out) == n_out and seen[-1].finished and seen[-1].finish_reason == reason
    assert all(not d.finished for d in seen[:-1])
    assert s.pages.num_free == s.config.num_pages and "a" not in s.requests


def test_stop_token_id_is_recorded():
    s = make(page_tokens=4)
    r = req("a", 3, stop_token_ids=(9, 10))
    s.add_request(r)
    step(s, token=10)
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_token_id == 10 and r.finish_reason == "stop"


def test_max_model_len_stops_with_length():
    s = make(page_tokens=4, max_model_len=10)
    r = req("a", 8)
    s.add_request(r)
    step(s)
    _, deltas = step(s)
    assert deltas[0].finished and deltas[0].finish_reason == "length" and r.num_tokens == 10
    assert r.status is RequestStatus.FINISHED_LENGTH


def test_logprobs_travel_with_the_tokens():
    s = make(page_tokens=4)
    s.add_request(req("a", 3, max_tokens=1, logprobs=1))
    out = s.schedule()
    lp = [(-0.5, {7: -0.5})]
    deltas = s.update_from_output(out, ModelRunnerOutput(["a"], [[7]], [lp]))
    assert deltas[0].new_logprobs == lp and deltas[0].finished


# ---------------------------------------------------------------- prefix caching
def test_shared_prefix_hits_and_refcounts():
    s = make(num_pages=8, page_tokens=256, max_num_batched_tokens=2048)
    prefix = list(range(5000, 5512))
    s.add_request(req("a", prefix + [1] * 100))
    out, _ = step(s)
    a_pages = s.requests["a"].page_ids
    assert sorted(out.pages_to_snapshot) == a_pages[:2]  # the two full pages; the third holds 100
    s.add_request(req("b", prefix + [2] * 50))
    out, _ = step(s)
    (new,) = out.new_reqs
    assert new.num_computed_tokens == 512 and new.page_ids[:2] == a_pages[:2]
    assert out.num_scheduled_tokens["b"] == 50 and s.requests["b"].num_cached_tokens == 512
    assert [s.pages.refcount(p) for p in a_pages[:2]] == [2, 2]
    # A prompt that is exactly the cached prefix: the hit stops one page short of covering it.
    s.add_request(req("c", prefix))
    out, _ = step(s)
    assert out.new_reqs[0].num_computed_tokens == 256 and out.num_scheduled_tokens["c"] == 256
    assert s.pages.refcount(a_pages[0]) == 3 and s.pages.refcount(a_pages[1]) == 2
    for r in ("a", "b", "c"):
        s.abort_request(r)
    assert s.pages.num_free == 8 and s.pages.num_evictable > 0
    assert s.stats()["prefix_hit_rate"] == pytest.approx((512 + 256) / (612 + 562 + 512))


def test_evicted_pages_stop_hitting():
    s = make(num_pages=8, page_tokens=256, max_num_batched_tokens=2048)
    prefix = list(range(5000, 5512))
    s.add_request(req("a", prefix + [1], max_tokens=1))
    step(s)
    s.add_request(req("big", [3] * 2048, max_tokens=1))  # needs every page: evicts the cached prefix
    step(s)
    step(s)
    s.add_request(req("b", prefix + [2]))
    out, _ = step(s)
    assert out.new_reqs[0].num_computed_tokens == 0


def test_prefix_caching_off_never_hits():
    s = make(num_pages=8, page_tokens=4, enable_prefix_caching=False)
    s.add_request(req("a", 9, max_tokens=1))
    out, _ = step(s)
    assert out.pages_to_snapshot == {}
    s.add_request(req("b", 9))
    out, _ = step(s)
    assert out.new_reqs[0].num_computed_tokens == 0 and s.pages.prefix_queries == 0


def test_stats_keys():
    s = make(page_tokens=4)
    s.add_request(req("a", 5))
    step(s)
    st = s.stats()
    assert st["running"] == 1 and st["waiting"] == 0 and st["pages_used"] == 2
    assert st["pages_free"] == 62 and "prefix_hit_rate" in st and st["preemptions"] == 0


# ---------------------------------------------------------------- random stress against a mirror runner
class MirrorRunner:
    """Keeps per-request state from the diffs alone, as a model runner would, and checks them.

    Prefix snapshots are the exact tokens up to a page's end, so a hit restoring the wrong state fails."""

    def __init__(self, page_tokens: int, rng: random.Random) -> None:
        self.p, self.rng = page_tokens, rng
        self.state: dict[str, dict] = {}
        self.snap: dict[int, tuple[int, ...]] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        p = self.p
        for rid in out.finished_req_ids | out.preempted_req_ids:
            self.state.pop(rid, None)
        for new in out.new_reqs:
            assert new.req_id not in self.state
            toks = new.prompt_token_ids + new.output_token_ids
            h = new.num_computed_tokens
            assert h % p == 0 and h < len(toks) and new.num_sampled_before == len(new.output_token_ids)
            if h:
                assert self.snap[new.page_ids[h // p - 1]] == tuple(toks[:h])
            self.state[new.req_id] = {"tokens": toks, "pages": list(new.page_ids), "computed": h}
        c = out.cached_reqs
        for rid, pages, computed in zip(c.req_ids, c.new_page_ids, c.num_computed_tokens):
            st = self.state[rid]
            assert st["computed"] == computed
            st["pages"] += pages
        ids, sampled = [], []
        for rid, n in out.num_scheduled_tokens.items():
            st = self.state[rid]
            st["computed"] += n
            assert st["computed"] <= len(st["tokens"]) and len(st["pages"]) == -(-st["computed"] // p)
            ids.append(rid)
            if st["computed"] == len(st["tokens"]):
                tok = EOS if self.rng.random() < 0.04 else self.rng.randrange(2, 50)
                sampled.append([tok])
            else:
                sampled.append([])
        for page, rid in out.pages_to_snapshot.items():
            st = self.state[rid]
            end = (st["pages"].index(page) + 1) * p
            assert end <= st["computed"]
            self.snap[page] = tuple(st["tokens"][:end])
        for rid, toks in zip(ids, sampled):
            self.state[rid]["tokens"] += toks
        return ModelRunnerOutput(ids, sampled)


def _check_step(s: Scheduler, out: SchedulerOutput) -> None:
    cfg = s.config
    sched = out.num_scheduled_tokens
    assert out.total_num_scheduled_tokens == sum(sched.values()) <= cfg.max_num_batched_tokens
    assert all(n >= 1 for n in sched.values()) and len(s.running) <= cfg.max_num_seqs
    new_ids = [n.req_id for n in out.new_reqs]
    assert set(new_ids).isdisjoint(out.cached_reqs.req_ids)
    assert set(new_ids) | set(out.cached_reqs.req_ids) == set(sched) <= {r.req_id for r in s.running}
    assert not out.preempted_req_ids & set(sched)
    s.pages.check_integrity()
    owners: dict[int, int] = {}
    for r in s.running:
        assert len(set(r.page_ids)) == len(r.page_ids)
        for page in r.page_ids:
            owners[page] = owners.get(page, 0) + 1
        if r.req_id in sched:  # pages written this step belong to this request alone
            p = cfg.page_tokens
            for j in range(r.num_computed_tokens // p, -(-(r.num_computed_tokens + sched[r.req_id]) // p)):
                assert s.pages.refcount(r.page_ids[j]) == 1
    assert all(not r.page_ids for r in s.waiting)
    for page in range(cfg.num_pages):
        assert s.pages.refcount(page) == owners.get(page, 0), f"page {page}"
        if owners.get(page, 0) > 1:
            assert s.pages.key_of(page) is not None


def test_random_stress_invariants():
    rng = random.Random(1234)
    cfg = SchedulerConfig(num_pages=40, page_tokens=4, max_num_batched_tokens=32, max_num_seqs=8, max_model_len=64)
    s = Scheduler(cfg)
    runner = MirrorRunner(cfg.page_tokens, rng)
    # Prompts share prefixes; the bases differ only in their first page, so a lookup that ignored the
    # parent page would hit (wrongly) on their common later pages, and the mirror would catch it.
    common = [rng.randrange(2, 50) for _ in range(20)]
    bases = [[rng.randrange(2, 50) for _ in range(4)] + common for _ in range(3)]
    reqs: dict[str, Request] = {}
    streamed: dict[str, list[int]] = {}
    done: dict[str, str] = {}
    for it in range(3000):
        if it < 2500 and rng.random() < 0.3:
            prompt = rng.choice(bases)[: rng.randint(0, 24)] + [rng.randrange(2, 50) for _ in range(rng.randint(1, 20))]
            sp = SamplingParams(
                max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.2, stop_token_ids=rng.choice([(), (49,)])
            )
            r = Request(f"r{len(reqs)}", prompt, sp, eos_token_id=EOS)
            reqs[r.req_id] = r
            s.add_request(r)
        if rng.random() < 0.03 and s.requests:
            s.abort_request(rng.choice(sorted(s.requests)))
        out = s.schedule()
        _check_step(s, out)
        for d in s.update_from_output(out, runner.execute(out)):
            assert d.req_id not in done, "a delta after the request finished"
            streamed.setdefault(d.req_id, []).extend(d.new_token_ids)
            if d.finished:
                done[d.req_id] = d.finish_reason
        if not s.has_unfinished() and it >= 2500:
            break
    assert not s.has_unfinished() and set(done) == set(reqs)
    assert s.pages.num_free == cfg.num_pages and s.pages.num_used == 0
    for rid, r in reqs.items():
        assert streamed.get(rid, []) == r.output_token_ids
        assert r.finish_reason == done[rid] and len(r.output_token_ids) <= r.sampling_params.max_tokens
        assert r.num_tokens <= s.max_len or r.finish_reason == "abort"
    st = s.stats()
    assert st["preemptions"] > 0 and st["prefix_hit_tokens"] > 0  # the run exercised both
    assert set(done.values()) == {"stop", "length", "abort"}


class _FakeDisk:
    """A PrefixStore holding `cached` pages and `loaded` (>= cached) after the memory hits of any request."""

    def __init__(self, cached: int, loaded: int) -> None:
        self.cached, self.loaded, self.admitted = cached, loaded, []

    def trim(self, hits):
        return hits

    def lookup(self, req_id, tokens, num_hit_pages, max_pages):
        from scheduler.prefix_store import PrefixLoad

        return PrefixLoad(self.cached, self.loaded, None) if max_pages - num_hit_pages >= self.loaded else None

    def admit(self, req_id, load, page_ids):
        self.admitted.append((req_id, list(page_ids)))


def test_prefix_store_hit_is_computed_and_registered():
    s = make(page_tokens=16, max_num_batched_tokens=8)
    s.prefix_store = disk = _FakeDisk(cached=2, loaded=4)
    s.add_request(req("a", 100))
    out = s.schedule()
    (nr,) = out.new_reqs
    assert nr.num_computed_tokens == 32  # two pages from the store; the budget covers 8 tokens of page 3
    assert len(nr.page_ids) == 4  # the loaded pages 3-4 are allocated now, though the budget reaches only page 3
    assert disk.admitted == [("a", nr.page_ids)]
    r = s.requests["a"]
    assert len(r.page_keys) == 2 and s.pages.find_prefix(r.prompt_token_ids, 6) == nr.page_ids[:2]
    s.update_from_output(out, runner_output(s, out))
    assert r.num_computed_tokens == 40
    s.pages.check_integrity()
