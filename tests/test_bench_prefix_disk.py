"""bench/prefix_disk.py on a short prefix and one mode (tests/test_disk_cache.py covers every mode): the JSON has
its summary, and the tokens from disk and from memory equal the cold run's."""

from __future__ import annotations

import json

from bench.prefix_disk import main


def test_prefix_disk_bench(tiny_ckpt, tmp_path):
    out = tmp_path / "prefix_disk.json"
    main(["--out", str(out), "--model", str(tiny_ckpt), "--prefix-tokens", "640", "--suffix-tokens", "8",
          "--page-tokens", "128", "--period-tokens", "256", "--modes", "periodic"])
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["identical"] is True
    assert set(s["ttft_s"]) == {"cold", "memory", "write_periodic", "disk_periodic"}
    assert s["bytes_on_disk"]["periodic"] == res["disk"]["periodic"]["written"]["bytes_written"] > 0
    assert s["recomputed_tokens_per_hit"] == {"periodic": 128}  # 5 pages on disk, the checkpoint after page 4
    assert res["disk"]["periodic"]["read"]["hits"] == 1
