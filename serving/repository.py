"""The model repository: `DIR/NAME/VERSION/` artifacts, each loaded into a runtime with its
own batching scheduler. A request names a model and optionally a version; without one it
gets the numerically highest version.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.artifact import load_artifact
from serving.batching import Batcher, BatchLimits
from serving.errors import invalid, not_found
from serving.metrics import Metrics
from serving.runtime import ModelRuntime

log = logging.getLogger(__name__)
TASK_NAMES = {"lm": "a language model", "tag": "a tagger", "classify": "a classifier"}


@dataclass
class LoadedModel:
    name: str
    version: int
    runtime: ModelRuntime
    batcher: Batcher
    latest: bool = False
    start: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def task(self) -> str:
        return self.runtime.task

    @property
    def sessions_allowed(self) -> str | None:
        """None if sessions work on this model, else why not."""
        meta = self.runtime.artifact.metadata
        if not self.runtime.incremental:
            return (f"model {self.label} is bidirectional: it needs the whole text, so it "
                    "cannot read text piece by piece; use Tag or Classify")
        if self.task == "classify" and meta.get("pooling", "final") != "final":
            return (f"model {self.label} pools with '{meta['pooling']}', which needs the whole "
                    "text; sessions need a classifier with final-state pooling")
        return None

    def initial_state(self) -> np.ndarray:
        return self.runtime.initial_state(1)[:, 0]

    async def start_point(self) -> tuple[np.ndarray, np.ndarray]:
        """(state, next-token log-probs) after reading `<eos>`: where every sentence starts."""
        if self.start is None:
            eos = np.array([self.runtime.vocab.eos_id], np.int64)
            result = await self.batcher.run(eos, self.initial_state(), eos)
            self.start = (result.state, result.next_logprobs)
        return self.start


class ModelRepository:
    def __init__(self, root: str | Path, device: str, threads: int, allow_cpu_fallback: bool,
                 limits: BatchLimits, metrics: Metrics, spin_threads: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root}: no such directory")
        self.models: dict[str, dict[int, LoadedModel]] = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            versions = sorted((int(v.name), v) for v in model_dir.iterdir()
                              if v.is_dir() and re.fullmatch(r"\d+", v.name))
            if not versions:
                log.warning("%s: no integer version directories; skipped", model_dir)
                continue
            loaded = {}
            for version, path in versions:
                runtime = ModelRuntime(load_artifact(path), device, threads, allow_cpu_fallback,
                                       spin_threads)
                label = f"{model_dir.name}/{version}"
                meta = runtime.artifact.metadata
                metrics.add_model(label, model_dir.name, version, runtime.task, meta["cell"],
                                  runtime.device)
                loaded[version] = LoadedModel(model_dir.name, version, runtime,
                                              Batcher(runtime, label, limits, metrics))
            loaded[versions[-1][0]].latest = True
            self.models[model_dir.name] = loaded
        if not self.models:
            raise FileNotFoundError(f"model repository {self.root}: no models (expected "
                                    "NAME/VERSION/ artifact directories)")

    def all(self) -> list[LoadedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def get(self, name: str, version: int, task: str | None = None,
            field_name: str = "model") -> LoadedModel:
        if not name:
            raise invalid(f"{field_name}.name", "required")
        if version < 0:
            raise invalid(f"{field_name}.version", f"must be >= 0, got {version}")
        versions = self.models.get(name)
        if versions is None:
            raise not_found(f"{field_name}.name: no model named {name!r} (serving: "
                            f"{', '.join(sorted(self.models))})", model=name)
        model = versions.get(version) if version else max(versions.items())[1]
        if model is None:
            raise not_found(f"{field_name}.version: model {name!r} has no version {version} "
                            f"(versions: {', '.join(map(str, sorted(versions)))})", model=name)
        if task is not None and model.task != task:
            raise invalid(f"{field_name}.name", f"model {model.label} is "
                          f"{TASK_NAMES[model.task]}, not {TASK_NAMES[task]}")
        return model

    def start(self) -> None:
        for model in self.all():
            model.batcher.start()

    async def close(self) -> None:
        for model in self.all():
            await model.batcher.close()

