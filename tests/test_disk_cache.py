"""The disk tier under the prefix cache (issue 15): hits after an engine restart in each window strategy give
the cold run's tokens; torn/corrupt files are misses; a full or unwritable disk leaves the memory cache."""

from __future__ import annotations

import errno
import logging
import random

import pytest

from engine import SamplingParams
from engine.cache import disk as disk_mod
from engine.cache.disk import DiskCacheConfig, decode_page, encode_page, prefix_hashes
from engine.core.engine import EngineConfig, LLMEngine
from engine.model.generate import greedy_generate

P = 128  # page tokens
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
_rng = random.Random(11)
PREFIX = [_rng.randrange(2, 512) for _ in range(6 * P)]  # 6 pages; none mode recomputes 4 (4 layers x 127)
PROMPT_A = PREFIX + [_rng.randrange(2, 512) for _ in range(40)]
PROMPT_B = PREFIX + [_rng.randrange(2, 512) for _ in range(25)]


@pytest.fixture(scope="module")
def want_b(tiny_model):
    return greedy_generate(tiny_model, [PROMPT_B], GREEDY.max_tokens)[0]


def _engine(tiny_ckpt, disk: DiskCacheConfig | None) -> LLMEngine:
    return LLMEngine(tiny_ckpt, EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, page_tokens=P,
                                             num_pages=64, disk_cache=disk))


def _generate(engine: LLMEngine, prompt: list[int]) -> list[int]:
    rid = engine.add_request(prompt, GREEDY)
    out: list[int] = []
    while engine.has_unfinished():
        for ro in engine.step():
            assert ro.req_id == rid
            out += ro.new_token_ids
    return out


def _warm(tiny_ckpt, cfg: DiskCacheConfig) -> dict:
    """A first engine computes PROMPT_A (writing its pages) and goes away; its disk figures."""
    engine = _engine(tiny_ckpt, cfg)
    _generate(engine, PROMPT_A)
    return engine.stats()["disk"]


@pytest.mark.parametrize("swa", ["full", "periodic", "none"])
def test_hit_after_restart_equals_cold_run(tiny_ckpt, want_b, tmp_path, swa):
    cfg = DiskCacheConfig(str(tmp_path / "kv"), capacity_gb=1.0, swa=swa, period_tokens=2 * P)
    written = _warm(tiny_ckpt, cfg)
    assert written["pages_written"] == 6  # the full pages of PROMPT_A and its outputs
    engine = _engine(tiny_ckpt, cfg)  # a restart: new engine, empty memory cache, same disk
    assert _generate(engine, PROMPT_B) == want_b
    d = engine.stats()["disk"]
    hit = engine.disk.last_hit
    assert d["hits"] == 1 and d["corrupt"] == 0
    per_token = written["bytes_written"] / written["tokens_written"]
    print(f"\n[disk {swa}] bytes written per token {per_token:.0f}; hit: {hit}")
    if swa == "full":  # restored at the last full page of the prompt, nothing recomputed before it
        assert hit["restored_at"] == 6 * P and hit["recomputed_tokens"] == 0
    elif swa == "periodic":  # the last checkpoint at or before page 6: 6 * P is a multiple of 2 * P
        assert hit["restored_at"] == 6 * P and hit["cached_tokens"] == 6 * P
    else:  # entries of all 6 pages loaded; the window rebuilt over the 4 pages before the end
        assert hit["loaded_tokens"] == 6 * P and hit["recomputed_tokens"] == 4 * P
        assert hit["cached_tokens"] == 2 * P
    # a third request with the prefix is now a memory hit (the recomputed states are a cold run's)
    assert engine.scheduler.pages.prefix_hit_tokens >= 2 * P
    assert _generate(engine, PROMPT_B) == want_b
    assert engine.stats()["prefix_hit_tokens"] >= hit["cached_tokens"] + 6 * P


def test_periodic_restores_the_checkpoint_before(tiny_ckpt, tiny_model, tmp_path):
    cfg = DiskCacheConfig(str(tmp_path / "kv"), swa="periodic", period_tokens=4 * P)
    _warm(tiny_ckpt, cfg)
    engine = _engine(tiny_ckpt, cfg)
    assert _generate(engine, PROMPT_B) == greedy_generate(tiny_model, [PROMPT_B], GREEDY.max_tokens)[0]
    assert engine.disk.last_hit["restored_at"] == 4 * P  # pages 5 and 6 are recomputed by ordinary prefill
    assert engine.disk.last_hit["recomputed_tokens"] == 2 * P


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_page_is_a_miss(tiny_ckpt, want_b, tmp_path, caplog, damage):
    cfg = DiskCacheConfig(str(tmp_path / "kv"), swa="full")
    _warm(tiny_ckpt, cfg)
    engine = _engine(tiny_ckpt, cfg)
    name = prefix_hashes(PROMPT_B, P, 3)[2]  # the third page of the shared prefix
    path = engine.disk._file(name)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="engine.cache.disk"):
        assert _generate(engine, PROMPT_B) == want_b
    d = engine.stats()["disk"]
    assert d["corrupt"] == 1 and engine.disk.last_hit["restored_at"] == 2 * P  # pages 1-2 from disk, then recompute
    assert any("unusable" in r.message for r in caplog.records)
    # the recomputed page was written again, whole: a restart now restores all six pages
    again = _engine(tiny_ckpt, cfg)
    assert _generate(again, PROMPT_B) == want_b
    assert again.disk.last_hit["restored_at"] == 6 * P


def test_unwritable_path_is_memory_only(tiny_ckpt, want_b, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="engine.cache.disk"):
        engine = _engine(tiny_ckpt, DiskCacheConfig(str(blocker / "kv")))
        assert _generate(engine, PROMPT_B) == want_b
        assert _generate(engine, PROMPT_B) == want_b  # the memory prefix cache still works
    assert not engine.disk.enabled
    assert engine.stats()["prefix_hit_tokens"] >= 6 * P
    assert sum("disk KV cache off" in r.message for r in caplog.records) == 1


def test_full_disk_degrades_with_one_warning(tiny_ckpt, want_b, tmp_path, caplog, monkeypatch):
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    engine = _engine(tiny_ckpt, DiskCacheConfig(str(tmp_path / "kv")))
    monkeypatch.setattr(disk_mod.os, "replace", full)
    with caplog.at_level(logging.WARNING, logger="engine.cache.disk"):
        assert _generate(engine, PROMPT_A) == greedy_generate(engine.model, [PROMPT_A], GREEDY.max_tokens)[0]
        assert _generate(engine, PROMPT_B) == want_b
    assert not engine.disk.enabled and engine.disk.stats["pages_written"] == 0
    assert sum("disk KV cache off" in r.message for r in caplog.records) == 1
    assert not list((tmp_path / "kv").rglob("*.tmp"))  # the half-written file is gone


def test_capacity_evicts_least_recently_used(tiny_ckpt, tmp_path):
    cfg = DiskCacheConfig(str(tmp_path / "kv"), swa="none")
    engine = _engine(tiny_ckpt, cfg)
    _generate(engine, PROMPT_A)
    page_bytes = max(size for size, _ in engine.disk.index.values())
    small = DiskCacheConfig(str(tmp_path / "small"), capacity_gb=3.5 * page_bytes / 2**30, swa="none")
    engine = _engine(tiny_ckpt, small)
    _generate(engine, PROMPT_A)
    d = engine.stats()["disk"]
    assert d["files"] == 3 and d["evicted"] == d["pages_written"] - 3
    assert d["bytes_on_disk"] <= small.capacity_bytes
    names = prefix_hashes(PROMPT_A, P, len(PROMPT_A) // P)
    assert list(engine.disk.index) == names[-3:]  # the newest pages stay
    restarted = _engine(tiny_ckpt, small)  # the index is rebuilt from the files, oldest first
    assert list(restarted.disk.index) == names[-3:]


def test_page_file_round_trip_and_checks(tiny_ckpt, tmp_path):
    engine = _engine(tiny_ckpt, DiskCacheConfig(str(tmp_path / "kv"), swa="full"))
    _generate(engine, PROMPT_A)
    name = prefix_hashes(PROMPT_A, P, 1)[0]
    data = engine.disk._file(name).read_bytes()
    page = decode_page(data, name, P, "cpu")
    assert page.state is not None and len(page.state) == engine.model_config.num_hidden_layers
    assert encode_page(name, P, page) == data
    with pytest.raises(disk_mod.CorruptPage, match="expected"):
        decode_page(data, name, 2 * P, "cpu")  # a file renamed onto another prefix or position


def test_config_errors():
    with pytest.raises(ValueError, match="swa must be one of"):
        DiskCacheConfig("/tmp/x", swa="some")
    with pytest.raises(ValueError, match="capacity_gb"):
        DiskCacheConfig("/tmp/x", capacity_gb=0)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching=False, disk_cache=DiskCacheConfig("/tmp/x"))
