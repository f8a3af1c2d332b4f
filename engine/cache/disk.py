"""The disk tier under the prefix cache (issue 15; DESIGN.md "KV cache").

A full page of a sequence is written to one file named by its prefix chain's hash: the hash of the
previous page's hash and this page's tokens, so a name stands for the whole prefix up to the page's end.
A file holds the page's compressed entries and indexer keys of every layer and, depending on the
window strategy (`swa`), the window/compressor state at the page's end:

    full      the state at every page boundary is stored: a hit restores the last page found
    periodic  stored at boundaries that are multiples of `period_tokens`: a hit restores the last such
              checkpoint found, the tokens after it are recomputed as ordinary prefill
    none      no state is stored: a hit loads the entries of every page found, starts from an empty window
              `num_layers * (sliding_window - 1)` tokens (rounded up to a page) before the last page's end and
              recomputes up to it. Exact: a token's window reaches `sliding_window - 1` tokens back, so after
              layer l only tokens `(l + 1) * (sliding_window - 1)` past the start can depend on the missing
              window; the recomputed span covers every layer's reach, and the entries it would emit come from
              disk (the recompute does not write them), so every state after it equals a cold run's.

Every file carries a blake2b checksum of its contents; a file that fails it (torn, corrupt, wrong shape)
is a miss, deleted and recomputed. The directory is capped at `capacity_gb`, least recently used files
go first (file mtimes carry the order across restarts). A failed write (full disk, unwritable path)
turns the tier off: the engine goes on with the memory cache alone, after one warning.

Files live under `<path>/<fingerprint>/` where the fingerprint names the model (config, cache dtype,
page size, a sample of the non-expert weights): another model's pages can never match. An FP8 cache
(engine.cache.fp8) writes its pages' packed bytes as they are: uint8 rows of the fp8_ds_mla layout, so a page
costs on disk what it costs in memory (engine.cache.accounting's bytes per entry).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.cache.disk_config import SWA_MODES, DiskCacheConfig
from engine.cache.kv_cache import PagedKVCache
from engine.cache.seq_state import EntryStore, LayerSnapshot, PagedEntries
from engine.model.model import SequenceState, Transformer
from scheduler.output import SchedulerOutput
from scheduler.prefix_store import PrefixLoad

log = logging.getLogger(__name__)
__all__ = ["SWA_MODES", "DiskCacheConfig", "DiskTier", "decode_page", "encode_page", "prefix_hashes"]

_MAGIC = b"MSKVPAG1"
_HEADER = struct.Struct("<8sHHI32s")  # magic, version, flags (bit 0: has state), meta length, checksum
_VERSION = 1
_SUFFIX = ".kvp"
_STALE_TMP_S = 600.0  # a temporary file older than this is a dead writer's (another rank may be writing now)


def prefix_hashes(tokens: list[int], page_tokens: int, num_pages: int, salt: bytes = b"") -> list[str]:
    """The chain hash (hex) of each of the first `num_pages` full pages of `tokens`."""
    out, prev = [], salt
    for j in range(num_pages):
        page = tokens[j * page_tokens:(j + 1) * page_tokens]
        if len(page) != page_tokens:
            raise ValueError(f"page {j} is not full: {len(page)} of {page_tokens} tokens")
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(struct.pack(f"<{page_tokens}q", *page))
        prev = h.digest()
        out.append(h.hexdigest())
    return out


def model_fingerprint(model: Transformer, cache_dtype: torch.dtype, page_tokens: int) -> str:
    """Names the model a page belongs to: its config, the cache dtype, the page size and a sample (first and
    last values) of every non-expert weight. The expert weights are left out, so every rank of an EP group
    (each holding other experts of the same model) shares the pages."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{cache_dtype}|{page_tokens}|v{_VERSION}".encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if ".experts." in name or t.numel() == 0:
                continue
            flat = t.reshape(-1)
            sample = torch.cat([flat[:8], flat[-8:]]).to("cpu").contiguous().view(torch.uint8)  # any dtype
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode() + sample.numpy().tobytes())
    return h.hexdigest()


@dataclass
class PageFile:
    """The contents of one page file."""

    entries: dict[str, torch.Tensor]  # "comp.<layer>" / "index.<layer>" -> [entries per page, d]
    state: list[LayerSnapshot] | None  # every main layer's state at the page's end, when stored


@dataclass
class _DiskLoad:
    """PrefixLoad.payload: what the scheduler admits."""

    first_page: int  # page index (in the sequence) of pages[0]
    pages: list[PageFile]
    restart_at: int | None  # none mode: the token the recompute starts from (the window there is empty)
    exact_from: int  # tokens from here on have exact state
    found_end: int  # the end of the pages found on disk: tokens from the restored point up to here are recomputed


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def encode_page(name: str, boundary: int, page: PageFile) -> bytes:
    """One page file: header (magic, version, flags, meta length, checksum), JSON meta, tensor bytes."""
    tensors: list[tuple[str, torch.Tensor]] = list(page.entries.items())
    if page.state is not None:
        for i, snap in enumerate(page.state):
            tensors.append((f"state.{i}.window", snap.window))
            for key, prev in (("comp", snap.comp_prev), ("index", snap.index_prev)):
                if prev is not None:
                    tensors += [(f"state.{i}.{key}_kv", prev[0]), (f"state.{i}.{key}_gate", prev[1])]
    blobs, table, offset = [], [], 0
    for key, t in tensors:
        b = _to_bytes(t)
        table.append([key, str(t.dtype).removeprefix("torch."), list(t.shape), offset, len(b)])
        blobs.append(b)
        offset += len(b)
    meta = json.dumps({"hash": name, "boundary": boundary, "num_layers": len(page.state or []),
                       "tensors": table}).encode()
    body = meta + b"".join(blobs)
    digest = hashlib.blake2b(body, digest_size=32).digest()
    return _HEADER.pack(_MAGIC, _VERSION, int(page.state is not None), len(meta), digest) + body


class CorruptPage(ValueError):
    pass


def decode_page(data: bytes, name: str, boundary: int, device: torch.device | str) -> PageFile:
    """The page in `data`; raises CorruptPage when anything does not check (magic, checksum, name, boundary)."""
    if len(data) < _HEADER.size:
        raise CorruptPage(f"{len(data)} bytes: shorter than the header")
    magic, version, flags, meta_len, digest = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise CorruptPage(f"not a page file of version {_VERSION} (magic {magic!r}, version {version})")
    body = data[_HEADER.size:]
    if len(body) < meta_len or hashlib.blake2b(body, digest_size=32).digest() != digest:
        raise CorruptPage("checksum mismatch (torn or corrupt file)")
    meta = json.loads(body[:meta_len])
    if meta["hash"] != name or meta["boundary"] != boundary:
        raise CorruptPage(f"file holds prefix {meta['hash']} at {meta['boundary']}, expected {name} at {boundary}")
    payload = memoryview(body)[meta_len:]
    tensors = {}
    for key, dtype, shape, offset, nbytes in meta["tensors"]:
        raw = torch.frombuffer(bytearray(payload[offset:offset + nbytes]), dtype=torch.uint8) if nbytes \
            else torch.empty(0, dtype=torch.uint8)
        tensors[key] = raw.view(getattr(torch, dtype)).reshape(shape).to(device)
    entries = {k: v for k, v in tensors.items() if not k.startswith("state.")}
    state = None
    if flags & 1:
        state = []
        for i in range(meta["num_layers"]):
            prev = {key: (tensors[f"state.{i}.{key}_kv"], tensors[f"state.{i}.{key}_gate"])
                    for key in ("comp", "index") if f"state.{i}.{key}_kv" in tensors}
            state.append(LayerSnapshot(tensors[f"state.{i}.window"], prev.get("comp"), prev.get("index")))
    return PageFile(entries, state)


class SkipEntries(EntryStore):
    """A layer's entries during a none-mode recompute: entries below `limit` are already in the pages (from
    disk) and are not written again; once `n` reaches `limit` it puts an ordinary PagedEntries in its place."""

    def __init__(self, pool: torch.Tensor, page_ids: list[int], n: int, limit: int, codec=None) -> None:
        self.pool, self.page_ids, self.n, self.limit, self.codec = pool, page_ids, n, limit, codec
        self.owner = None  # the CompressorState holding this store

    def append(self, entries: torch.Tensor) -> None:
        k = entries.shape[0]
        keep = max(0, self.n + k - max(self.n, self.limit))  # rows at or past limit are new
        if keep:
            PagedEntries(self.pool, self.page_ids, self.n + k - keep, self.codec).append(entries[k - keep:])
        self.n += k
        if self.n >= self.limit and self.owner is not None:
            self.owner.store = PagedEntries(self.pool, self.page_ids, self.n, self.codec)

    def read(self, n: int) -> torch.Tensor:
        return PagedEntries(self.pool, self.page_ids, self.n, self.codec).read(n)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        return PagedEntries(self.pool, self.page_ids, self.n, self.codec).gather(idx)

    def paged_view(self) -> tuple[torch.Tensor, torch.Tensor, object]:
        return PagedEntries(self.pool, self.page_ids, self.n, self.codec).paged_view()


class DiskTier:
    """The disk level of one rank's prefix cache: the scheduler's PrefixStore, and the runner's hooks
    (`new_sequence` for a none-mode restart, `after_step` to write the pages a step filled, `forget`)."""

    def __init__(self, config: DiskCacheConfig, cache: PagedKVCache, model: Transformer) -> None:
        self.config, self.cache, self.model = config, cache, model
        self.page_tokens = p = cache.page_tokens
        if config.swa == "periodic" and config.period_tokens % p:
            raise ValueError(f"disk cache period_tokens={config.period_tokens} must be a multiple of "
                             f"page_tokens={p}")
        cfg = model.cfg
        self.num_layers = cfg.num_hidden_layers
        # none mode: tokens to recompute before a restored boundary (rounded up to whole pages)
        reach = self.num_layers * max(cfg.sliding_window - 1, 0)
        self.recompute_tokens = -(-reach // p) * p
        self.device = model.embed.weight.device
        dtype = next(iter(cache.comp_pools.values())).dtype if cache.comp_pools else model.dtype
        self.dir = Path(config.path) / model_fingerprint(model, dtype, p)
        self.enabled = True
        self.index: OrderedDict[str, tuple[int, bool]] = OrderedDict()  # hash -> (bytes, has state); LRU first
        self.total_bytes = 0
        self._hashes: dict[str, list[str]] = {}  # req id -> chain hashes of its pages (write path)
        self._restarts: dict[str, _DiskLoad] = {}  # req id -> a none-mode load the runner must start from
        self._exact_from: dict[str, int] = {}  # req id -> first token whose state is exact (none-mode restart)
        self._lookup_memo: tuple[tuple, PrefixLoad | None] | None = None
        self.stats = {"pages_written": 0, "bytes_written": 0, "tokens_written": 0, "hits": 0,
                      "hit_tokens": 0, "pages_loaded": 0, "recomputed_tokens": 0, "corrupt": 0, "evicted": 0}
        self.last_hit: dict[str, int] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe.{os.getpid()}"  # ranks of a group may share the folder
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            self._disable(f"cannot write to {self.dir}: {e}")
            return
        self._scan()

    # ---- files ----
    def _file(self, name: str) -> Path:
        return self.dir / name[:2] / (name + _SUFFIX)

    def _scan(self) -> None:
        found = []
        now = time.time()
        for f in self.dir.glob(f"*/*{_SUFFIX}*"):
            try:
                st = f.stat()
                if not f.name.endswith(_SUFFIX):  # a temporary file: of a write that never finished when old
                    if now - st.st_mtime > _STALE_TMP_S:
                        f.unlink(missing_ok=True)
                    continue
                with open(f, "rb") as fh:
                    head = fh.read(_HEADER.size)
                flags = _HEADER.unpack(head)[2] if len(head) == _HEADER.size else 0
            except (OSError, struct.error):
                continue
            found.append((st.st_mtime_ns, f.name[:-len(_SUFFIX)], st.st_size, bool(flags & 1)))
        for _, name, size, has_state in sorted(found):
            self.index[name] = (size, has_state)
            self.total_bytes += size

    def _disable(self, why: str) -> None:
        if self.enabled:
            log.warning("disk KV cache off, the engine continues with the memory cache only: %s", why)
        self.enabled = False

    def _drop(self, name: str) -> None:
        size, _ = self.index.pop(name, (0, False))
        self.total_bytes -= size
        try:
            self._file(name).unlink(missing_ok=True)
        except OSError as e:  # a read-only folder: the write that needed room fails next and turns the tier off
            log.debug("disk KV cache: could not delete %s: %s", name, e)

    def _read(self, name: str, boundary: int) -> PageFile | None:
        """The page, or None (a miss) when it is gone or fails its checks (then it is deleted)."""
        path = self._file(name)
        try:
            data = path.read_bytes()
            page = decode_page(data, name, boundary, self.device)
            self._check_shapes(page)
        except FileNotFoundError:
            self._drop(name)
            return None
        except (OSError, CorruptPage, ValueError, KeyError, RuntimeError, TypeError) as e:
            log.warning("disk KV cache: page %s is unusable (%s); recomputing it", path, e)
            self.stats["corrupt"] += 1
            self._drop(name)
            return None
        self.index.move_to_end(name)
        try:
            os.utime(path)
        except OSError:
            pass
        return page

    def _check_shapes(self, page: PageFile) -> None:
        want = {f"comp.{i}": (pool.shape[1:], pool.dtype) for i, pool in self.cache.comp_pools.items()}
        want |= {f"index.{i}": (pool.shape[1:], pool.dtype) for i, pool in self.cache.index_pools.items()}
        got = {k: (v.shape, v.dtype) for k, v in page.entries.items()}
        if got != want:
            raise CorruptPage(f"entry shapes/dtypes {got} do not match this cache's {want}")
        if page.state is not None and len(page.state) != self.num_layers:
            raise CorruptPage(f"state of {len(page.state)} layers, the model has {self.num_layers}")

    def _write(self, name: str, boundary: int, page: PageFile) -> None:
        data = encode_page(name, boundary, page)
        cap = self.config.capacity_bytes
        if len(data) > cap:
            return
        old = self.index.pop(name, None)
        if old is not None:
            self.total_bytes -= old[0]
        while self.index and self.total_bytes + len(data) > cap:
            victim = next(iter(self.index))
            self._drop(victim)
            self.stats["evicted"] += 1
        path = self._file(name)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self._disable(f"writing {path} failed: {e}")
            return
        self.index[name] = (len(data), page.state is not None)
        self.total_bytes += len(data)
        self.stats["pages_written"] += 1
        self.stats["bytes_written"] += len(data)
        self.stats["tokens_written"] += self.page_tokens

    def _known(self, name: str) -> bool:
        """In the index, or written since by another process sharing the directory."""
        if name in self.index:
            return True
        path = self._file(name)
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(_HEADER.size)
            flags = _HEADER.unpack(head)[2]
        except (OSError, struct.error):
            return False
        self.index[name] = (size, bool(flags & 1))
        self.total_bytes += size
        return True

    # ---- the scheduler's PrefixStore ----
    def trim(self, hits: list[int]) -> list[int]:
        snaps = self.cache.snapshots
        k = len(hits)
        while k and hits[k - 1] not in snaps:
            k -= 1
        return hits[:k]

    def lookup(self, req_id: str, tokens: list[int], num_hit_pages: int, max_pages: int) -> PrefixLoad | None:
        if not self.enabled or max_pages <= num_hit_pages:
            return None
        key = (req_id, num_hit_pages, max_pages, len(tokens))
        if self._lookup_memo is not None and self._lookup_memo[0] == key:
            return self._lookup_memo[1]  # the same request again (its pages did not fit last step)
        load = self._lookup(tokens, num_hit_pages, max_pages)
        self._lookup_memo = (key, load)
        return load

    def _lookup(self, tokens: list[int], h: int, max_pages: int) -> PrefixLoad | None:
        p, mode = self.page_tokens, self.config.swa
        names = prefix_hashes(tokens, p, max_pages)
        m = h
        while m < max_pages and self._known(names[m]):
            m += 1
        if m == h:
            return None
        if mode == "none":
            restart = (m * p - self.recompute_tokens) // p * p
            if restart <= h * p:  # the recompute would reach back into the memory hit: nothing gained
                return None
            last = m
        else:
            last = m
            if mode == "periodic":  # the last page whose file holds a state
                while last > h and not self.index.get(names[last - 1], (0, False))[1]:
                    last -= 1
                if last == h:
                    return None
        pages = []
        for j in range(h, last):
            page = self._read(names[j], (j + 1) * p)
            if page is None:  # a miss from here on
                break
            pages.append(page)
        if mode == "none":
            m = h + len(pages)
            restart = (m * p - self.recompute_tokens) // p * p
            if restart <= h * p:
                return None
            return PrefixLoad(restart // p - h, m - h, _DiskLoad(h, pages, restart, m * p, m * p))
        found_end = (h + len(pages)) * p if len(pages) < last - h else m * p
        while pages and pages[-1].state is None:
            pages.pop()
        if not pages:
            return None
        restored = (h + len(pages)) * p
        return PrefixLoad(len(pages), len(pages), _DiskLoad(h, pages, None, restored, found_end))

    def admit(self, req_id: str, load: PrefixLoad, page_ids: list[int]) -> None:
        dl: _DiskLoad = load.payload
        self._lookup_memo = None
        cache = self.cache
        for page_id, page in zip(page_ids, dl.pages):  # len(dl.pages) == load.num_loaded_pages
            for key, t in page.entries.items():
                kind, layer = key.split(".")
                pool = (cache.comp_pools if kind == "comp" else cache.index_pools)[int(layer)]
                pool[page_id] = t.to(pool.dtype)
            if page.state is not None:
                cache.snapshots[page_id] = page.state
            else:
                cache.snapshots.pop(page_id, None)  # a state left by the page's earlier use
        p = self.page_tokens
        self.stats["hits"] += 1
        self.stats["pages_loaded"] += load.num_loaded_pages
        self.stats["hit_tokens"] += load.num_cached_pages * p
        restored = (dl.first_page + load.num_cached_pages) * p
        if dl.restart_at is not None:
            self._restarts[req_id] = dl
        # tokens computed again although their pages were on disk: none mode's window rebuild, or (periodic, or a
        # corrupt file) the pages after the restored state, which ordinary prefill recomputes
        recomputed = dl.found_end - restored
        self.stats["recomputed_tokens"] += recomputed
        self.last_hit = {"cached_tokens": load.num_cached_pages * p, "loaded_tokens": load.num_loaded_pages * p,
                         "recomputed_tokens": recomputed, "restored_at": restored}

    # ---- the runner's hooks ----
    def new_sequence(self, model: Transformer, req_id: str, page_ids: list[int], num_computed: int) -> SequenceState:
        """cache.new_sequence, except for a none-mode restart: then the state at `num_computed` has an empty
        window and entry stores that leave the loaded pages alone until the restored boundary."""
        self._exact_from.pop(req_id, None)
        dl = self._restarts.pop(req_id, None)
        if dl is None or dl.restart_at != num_computed:
            return self.cache.new_sequence(model, page_ids, num_computed)
        self._exact_from[req_id] = dl.exact_from
        cache, layers = self.cache, []
        ratios = model.cfg.compress_ratios
        for i, block in enumerate(model.layers):
            ratio = ratios[i]
            comp = SkipEntries(cache.comp_pools[i], page_ids, num_computed // ratio, dl.exact_from // ratio,
                               cache.kv_codec) if ratio else None
            index = SkipEntries(cache.index_pools[i], page_ids, num_computed // 4, dl.exact_from // 4,
                                cache.index_codec) if ratio == 4 else None
            st = block.attn.new_state(self.device, comp, index)
            st.num_tokens = num_computed
            for cs, store in ((st.comp, comp), (st.index, index)):
                if store is not None:
                    store.owner = cs
            layers.append(st)
        layers += [m.block.attn.new_state(self.device) for m in model.mtp]
        return SequenceState(layers)

    def forget(self, so: SchedulerOutput) -> None:
        """Drop what was kept for requests that left (finished, aborted, preempted)."""
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self._hashes.pop(rid, None)
            self._exact_from.pop(rid, None)

    def after_step(self, snaps: dict) -> None:
        """Pages filled this step (`snaps`: page id -> (runner request, boundary)) go to disk; a state captured
        during a none-mode recompute before its exact point is dropped (it is not a cold run's state)."""
        p, cfg = self.page_tokens, self.config
        for page_id, (r, b) in snaps.items():
            exact = self._exact_from.get(r.req_id)
            if exact is not None and b < exact:
                self.cache.snapshots.pop(page_id, None)
            if not self.enabled:
                continue
            names = self._hashes.setdefault(r.req_id, [])
            j = b // p
            if len(names) < j:
                tokens = r.tokens
                prev = bytes.fromhex(names[-1]) if names else b""
                names += prefix_hashes(tokens[len(names) * p:j * p], p, j - len(names), prev)
            name = names[j - 1]
            state = self.cache.snapshots.get(page_id)
            want_state = state is not None and (cfg.swa == "full" or (cfg.swa == "periodic"
                                                                       and b % cfg.period_tokens == 0))
            have = self.index.get(name)
            if have is not None and (have[1] or not want_state):
                self.index.move_to_end(name)
                continue
            entries = {f"comp.{i}": pool[page_id] for i, pool in self.cache.comp_pools.items()}
            entries |= {f"index.{i}": pool[page_id] for i, pool in self.cache.index_pools.items()}
            self._write(name, b, PageFile(entries, state if want_state else None))

    def summary(self) -> dict:
        return {"enabled": self.enabled, "swa": self.config.swa, "files": len(self.index),
                "bytes_on_disk": self.total_bytes, **self.stats}
