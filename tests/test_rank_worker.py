"""RankWorker start-up: a CPU rank compiles its C kernel before the step loop runs (the step watchdog restarts
a group whose step takes longer than health.step_timeout_s, and a first step that compiles can)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import engine.kernels.cpu
from cluster.rank_server import RankWorker
from tests.stand_in import EchoEngine


class _Engine(EchoEngine):
    def __init__(self, device: str | None) -> None:
        super().__init__()
        if device is not None:
            self.config = SimpleNamespace(device=device)


@pytest.mark.parametrize("device, builds", [("cpu", True), ("cuda", False), (None, False)])
def test_a_cpu_rank_builds_its_kernel_before_the_step_loop(monkeypatch, device, builds):
    seen: list[tuple[int, bool]] = []

    def available() -> bool:
        seen.append((worker.steps, bool(worker._threads)))  # the server and step threads start after it
        return True

    monkeypatch.setattr(engine.kernels.cpu, "moe_mlp_available", available)
    worker = RankWorker(_Engine(device), "127.0.0.1", 0)
    worker.start()
    try:
        assert seen == ([(0, False)] if builds else [])
        assert worker.running
    finally:
        worker.stop()
