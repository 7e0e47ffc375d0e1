"""A real server for tests: serving.server.Server on 127.0.0.1, an ephemeral port, in a
background thread with its own event loop; and helpers to read its metrics.

RECUR_TEST_DEVICE=cuda runs the servers of the serving tests on the GPU (make test-gpu)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from serving.client import RecurClient
from serving.config import ServerConfig
from serving.server import Server

TEST_DEVICE = os.environ.get("RECUR_TEST_DEVICE", "cpu")
PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class RunningServer:
    def __init__(self, repository, channel_factory=grpc.insecure_channel, **settings):
        settings.setdefault("device", TEST_DEVICE)
        self.config = dataclasses.replace(ServerConfig(model_repository=str(repository),
                                                       port=0, metrics_port=0, grace_s=2.0),
                                          **settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make())
        self.ports = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.ports.grpc}"
        self.channel = channel_factory(self.target)
        self.client = RecurClient(self.target, channel=self.channel)

    @property
    def http_url(self) -> str:
        """The HTTP port's base URL (http_port=0 to have one)."""
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.ports.http}"

    async def _make(self) -> Server:
        return Server(self.config)  # made in the loop: its asyncio objects belong there

    def call(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        self.call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.ports.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str, /, **labels: str) -> float:
        """The sum of a sample's values over the series matching `labels` (Triton's
        families by their names on the page: prometheus_client's parser would add _total)."""
        if name.startswith("nv_"):
            return triton_metric(self.metrics_text(), name, **labels)
        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total


def triton_metric(page: str, name: str, /, **labels: str) -> float:
    """The sum of the samples named exactly `name` matching `labels` on a metrics page."""
    total = 0.0
    for line in page.splitlines():
        if not line.startswith(name + "{"):
            continue
        series, _, value = line.rpartition(" ")
        pairs = dict(pair.split("=", 1) for pair in series[len(name) + 1:-1].split(","))
        if all(pairs.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


@contextlib.contextmanager
def running(repository, **settings):
    """A RunningServer that a test may stop itself (Server.stop runs once)."""
    server = RunningServer(repository, **settings)
    try:
        yield server
    finally:
        if not server.server.stopped.is_set():
            server.stop()
        else:
            server.channel.close()
            server.loop.call_soon_threadsafe(server.loop.stop)
            server.thread.join(10)
            server.loop.close()
