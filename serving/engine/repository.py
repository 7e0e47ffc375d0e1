"""The model repository: `DIR/NAME/VERSION/` artifacts, each loaded into a runtime with its
own scheduler. A request names a model and optionally a version; without one it gets the
highest version served.

Which versions are served is the version policy, as in Triton: the latest N (default 1),
all, or specific ones. `refresh` (at start, and every `repository_poll_s` while serving)
loads versions that enter the policy and retires those that leave it or whose folder is
gone. A retired version is found by no new lookup, but finishes the requests it holds and
goes on serving the sessions open on it, for at most `drain_s` (the session TTL); then
those sessions end, the requests still running on it finish, and the version is released:
its scheduler's thread and its ONNX Runtime session. A retired version back in the policy
before it is released serves again (no second copy is loaded).

At start and at every look alike, versions are taken highest first until the policy is
satisfied by versions that do load: one that fails to load (still being copied, corrupt)
is logged once, recorded in `unavailable` with its reason (ListModels reports it) and
retried at every look, and the next lower version takes its place; so a half-copied new
version takes down neither the serving one nor, at a restart, the whole server. With
`strict_start` the first version that fails at start stops the start; with nothing at all
loaded the start fails, naming each failure. A version folder's name is ASCII digits, at
most MAX_VERSION; other folders are skipped, logged once while they stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.engine.config import VersionPolicy
from serving.engine.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from serving.engine.metrics import Metrics
from serving.engine.prefix_cache import PrefixCache
from serving.engine.scheduler import BatchLimits, Scheduler
from serving.model.artifact import MAX_VERSION, load_artifact, version_of
from serving.model.runtime import ModelRuntime

log = logging.getLogger(__name__)
TASK_NAMES = {"lm": "a language model", "tag": "a tagger", "classify": "a classifier"}


class NoVersionLoaded(ValueError):
    """At start, no version in the policy loaded (the message names each failure)."""


@dataclass(frozen=True)
class ModelState:
    """A model folder's entry in the repository index (Triton's RepositoryIndex): a version
    served (READY), one retired and still serving its open sessions (UNLOADING), one that
    does not load, or a model with no version served (UNAVAILABLE, with the reason)."""

    name: str
    version: str  # "" for a model with no version served
    state: str
    reason: str = ""


class _PolicyWalk:
    """The versions found, highest first, as the policy takes them: iterating yields each
    `(name, version, path)` the policy would take next; `take()` says that the last one is
    served (it loaded, or was loaded already). One not taken (it failed to load) leaves
    its place to the next lower version."""

    def __init__(self, policy: VersionPolicy, scanned: dict[str, list[tuple[int, Path]]]):
        self.policy, self.scanned, self._taken = policy, scanned, 0

    def __iter__(self) -> Iterator[tuple[str, int, Path]]:
        for name, versions in self.scanned.items():
            self._taken = 0
            for version, path in versions:
                if self.policy.wanted(version, self._taken):
                    yield name, version, path

    def take(self) -> None:
        self._taken += 1


@dataclass(eq=False)
class LoadedModel:
    name: str
    version: int
    runtime: ModelRuntime
    scheduler: Scheduler
    # language models: the state and next-token log-probs after `<eos>`, computed at load
    start_state: np.ndarray | None = field(default=None, repr=False)
    start_logprobs: np.ndarray | None = field(default=None, repr=False)
    prefix_cache: PrefixCache | None = field(default=None, repr=False)  # language models
    latest: bool = False
    active: int = 0  # requests holding it (acquire .. release)
    retired: bool = False  # left the policy: no new lookup finds it
    released: bool = False  # unloaded: takes nothing more
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def task(self) -> str:
        return self.runtime.task

    @property
    def vocab(self):
        return self.runtime.vocab

    @property
    def labels(self) -> list[str]:
        """Tag or class names, in the order of the model's outputs ([] for a language
        model)."""
        return self.runtime.labels.names if self.runtime.labels else []

    @property
    def metadata(self) -> dict:
        return self.runtime.artifact.metadata

    @property
    def device(self) -> str:
        return self.runtime.device

    @property
    def device_id(self) -> int:
        return self.runtime.device_id

    @property
    def providers(self) -> list[str]:
        """The ONNX Runtime execution providers actually active."""
        return self.runtime.providers

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

    def acquire(self) -> None:
        """Holds the version loaded for one request: from its lookup (or its session) until
        its work is done. A released version takes none."""
        if self.released:
            raise NotFound(f"model {self.label} was unloaded (it left the version policy, or "
                           "its folder is gone)", "MODEL_UNLOADED", model=self.name)
        self.active += 1
        self._idle.clear()

    def release(self, *_) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[LoadedModel]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    async def idle(self) -> None:
        """Returns when no request holds the version."""
        if self.active:
            await self._idle.wait()


def _free(model: LoadedModel) -> None:
    """Closes the version's ONNX Runtime session now (references in cycles would keep it
    until a full garbage collection), then gives the heap's free pages back to the system
    (glibc's malloc_trim; elsewhere nothing), so that resident memory falls."""
    model.runtime.close()
    if model.prefix_cache is not None:  # its nodes refer to each other: unlinked now
        model.prefix_cache.clear(publish=False)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelRepository:
    def __init__(self, root: str | Path, device: str, threads: int, allow_cpu_fallback: bool,
                 limits: BatchLimits, metrics: Metrics, spin_threads: bool = False,
                 policy: VersionPolicy | None = None, drain_s: float = 600.0,
                 strict_start: bool = False, prefix_cache_bytes: int = 0,
                 prefix_cache_interval: int = 256):
        self.root = Path(root)
        self.prefix_cache_bytes, self.prefix_cache_interval = (prefix_cache_bytes,
                                                               prefix_cache_interval)
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root}: no such directory")
        self.device, self.threads, self.spin_threads = device, threads, spin_threads
        self.allow_cpu_fallback, self.limits, self.metrics = allow_cpu_fallback, limits, metrics
        self.policy = policy or VersionPolicy()
        self.drain_s = drain_s
        self.models: dict[str, dict[int, LoadedModel]] = {}
        # the versions in the policy that failed to load at the last look, and why (paths
        # in it relative to the repository); a version leaves it when it loads, or leaves
        # the repository or the policy
        self.unavailable: dict[tuple[str, int], str] = {}
        self._refused: dict[Path, int] = {}  # their folders: failed attempts in a row
        self._skipped: set[Path] = set()  # folders skipped at the last look (logged)
        self.retiring: dict[LoadedModel, asyncio.Task] = {}  # retired, and its release
        # set by the engine: how many sessions a version holds, and what to do with them
        # when it is released
        self.sessions_on: Callable[[LoadedModel], int] = lambda model: 0
        self.on_release: Callable[[LoadedModel], None] = lambda model: None
        self._warned: set[str] = set()
        self.started = False
        self.unloaded: set[str] = set()  # unloaded by a client (model control): not reloaded
        self._changing = asyncio.Lock()  # one refresh, load or unload at a time
        scanned = self._looked_at(self._scan())
        failed: dict[tuple[str, int, Path], Exception] = {}
        walk = _PolicyWalk(self.policy, scanned)
        for name, version, path in walk:  # highest first, as `refresh` does
            try:
                model = self._load(name, version, path)
            except Exception as error:
                if strict_start:
                    raise  # the first version that does not load stops the start
                failed[name, version, path] = error
                continue
            self._add(model)
            walk.take()
        if not self.models:
            if failed:
                raise NoVersionLoaded(
                    f"model repository {self.root}: no version loaded; " + "; ".join(
                        f"{name}/{version}: {error}"
                        for (name, version, _), error in failed.items()))
            raise FileNotFoundError(f"model repository {self.root}: no models (expected "
                                    "NAME/VERSION/ artifact directories)")
        self._settle(failed)  # the others serve; those retried at every look

    # -- the folder and the policy --------------------------------------------------------
    def _scan(self) -> tuple[dict[str, list[tuple[int, Path]]], dict[Path, str]]:
        """Each model's version folders, highest first; and the folders skipped, with why
        (hidden ones, where `recur export` stages a version, are passed over silently)."""
        found, skipped = {}, {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            versions = []
            for folder in model_dir.iterdir():
                if not folder.is_dir() or folder.name.startswith("."):
                    continue
                if (version := version_of(folder.name)) is None:
                    skipped[folder] = (f"not a version folder (a version is ASCII digits, "
                                       f"at most {MAX_VERSION})")
                else:
                    versions.append((version, folder))
            if versions:
                found[model_dir.name] = sorted(versions, reverse=True)
            else:
                skipped[model_dir] = "no version folders"
        return found, skipped

    def _looked_at(self, scan: tuple[dict[str, list[tuple[int, Path]]], dict[Path, str]]
                   ) -> dict[str, list[tuple[int, Path]]]:
        """Logs each folder skipped once while it stays (not at every look), and the models
        whose versions the policy serves none of; returns the versions found."""
        scanned, skipped = scan
        for path in sorted(skipped.keys() - self._skipped):
            log.warning("%s: %s; skipped", path, skipped[path])
        self._skipped = set(skipped)
        self._warn_unserved(scanned)
        return scanned

    def _warn_unserved(self, scanned: dict[str, list[tuple[int, Path]]]) -> None:
        """Once per model: one whose versions the policy (`specific:`) serves none of."""
        for name, versions in scanned.items():
            if name not in self._warned and not any(
                    self.policy.wanted(v, 0) for v, _ in versions):
                log.warning("%s: none of its versions (%s) is in the version policy %s; "
                            "not served", name, ", ".join(str(v) for v, _ in versions),
                            self.policy)
                self._warned.add(name)

    def _load(self, name: str, version: int, path: Path) -> LoadedModel:
        runtime = ModelRuntime(load_artifact(path), self.device, self.threads,
                               self.allow_cpu_fallback, self.spin_threads)
        label = f"{name}/{version}"
        model = LoadedModel(name, version, runtime,
                            Scheduler(runtime, label, self.limits, self.metrics))
        if runtime.task == "lm":
            model.start_state, model.start_logprobs = runtime.start_point()
            model.prefix_cache = PrefixCache(self.prefix_cache_bytes, self.prefix_cache_interval,
                                             model.start_state, model.start_logprobs,
                                             self.metrics, label)
        return model

    def _add(self, model: LoadedModel, start: bool = True) -> None:
        """Serves `model`; `start`: its scheduler is new and must be started."""
        self.metrics.add_model(model.label, model.name, model.version, model.task,
                               model.metadata["cell"], model.device)
        self.models.setdefault(model.name, {})[model.version] = model
        self._mark_latest(model.name)
        if self.started and start:
            model.scheduler.start()

    def _mark_latest(self, name: str) -> None:
        versions = self.models.get(name, {})
        for loaded in versions.values():
            loaded.latest = loaded.version == max(versions)

    # -- while serving --------------------------------------------------------------------
    async def refresh(self) -> list[str]:
        async with self._changing:
            return await self._refresh()

    async def _refresh(self) -> list[str]:
        """Loads the versions that entered the policy (ONNX Runtime's session setup runs off
        the event loop, so requests keep flowing) and unloads those that left it; returns
        the labels loaded. A version that fails to load (still being copied, or corrupt) is
        logged once and retried at the next refresh."""
        scanned = self._looked_at(await asyncio.to_thread(self._scan))
        scanned = {name: found for name, found in scanned.items() if name not in self.unloaded}
        fresh: list[LoadedModel] = []
        wanted: set[tuple[str, int]] = set()
        failed: dict[tuple[str, int, Path], Exception] = {}
        walk = _PolicyWalk(self.policy, scanned)
        for name, version, path in walk:  # highest first, as at start
            # back in the policy while its old instance drains: that one serves again
            if version not in self.models.get(name, {}) and not self._revive(name, version):
                try:
                    model = await asyncio.to_thread(self._load, name, version, path)
                except Exception as error:  # noqa: BLE001 (any failure: skip it, keep serving)
                    failed[name, version, path] = error
                    continue
                if attempts := self._refused.get(path):
                    log.info("%s: loaded after %d failed attempts", path, attempts)
                fresh.append(model)
            walk.take()
            wanted.add((name, version))
        # nothing awaits from here on: ListModels sees the versions served and the record of
        # those that failed change together
        self._settle(failed)
        for model in fresh:
            self._add(model)
            log.info("loaded %s", model.label)
        for model in [m for m in self.all() if (m.name, m.version) not in wanted]:
            self.unload(model)
        return [model.label for model in fresh]

    def _settle(self, failed: dict[tuple[str, int, Path], Exception]) -> None:
        """Records the versions that failed to load at this look, in place of the last
        look's. Each folder is logged at its first failure in a row only (a copy in
        progress fails differently at every look)."""
        refused = {}
        for (_, _, path), error in failed.items():
            if path not in self._refused:
                log.warning("%s: not loaded (retried at every look at the repository): %s",
                            path, error)
            refused[path] = self._refused.get(path, 0) + 1
        self._refused = refused
        self.unavailable = {(name, version): self._reason(error)
                            for (name, version, _), error in failed.items()}

    def _reason(self, error: Exception) -> str:
        """Why a version did not load, as clients are told: with the paths in it relative
        to the repository."""
        if self.root == Path("."):
            return str(error)
        # the root where a path starts: at the start, or after a space, a quote or a bracket
        return re.sub(rf"(?<![^\s'\"(\[]){re.escape(str(self.root) + os.sep)}", "",
                      str(error))

    def unload(self, model: LoadedModel) -> None:
        """Retires the version now: no new lookup finds it. It is released once nothing
        holds it and its sessions are gone, or `drain_s` from now at the latest."""
        versions = self.models.get(model.name, {})
        if versions.get(model.version) is not model:
            return
        del versions[model.version]
        if not versions:
            del self.models[model.name]
        self._mark_latest(model.name)
        model.retired = True
        meta = model.metadata
        with contextlib.suppress(KeyError):  # no longer served to new requests
            self.metrics.model_info.remove(model.name, str(model.version), model.task,
                                           meta["cell"], model.device)
        task = asyncio.get_running_loop().create_task(self._release(model))
        self.retiring[model] = task
        log.info("retiring %s (version policy %s)", model.label, self.policy)

    def _revive(self, name: str, version: int) -> bool:
        """A retired instance of `name`/`version` not yet released serves again."""
        for model, task in list(self.retiring.items()):
            if (model.name, model.version) == (name, version) and not model.released:
                task.cancel()
                del self.retiring[model]
                model.retired = False
                self._add(model, start=False)
                log.info("%s is back in the version policy: serving it again", model.label)
                return True
        return False

    async def _release(self, model: LoadedModel) -> None:
        deadline = time.monotonic() + self.drain_s
        while (self.sessions_on(model) or model.active) and (
                left := deadline - time.monotonic()) > 0:
            if self.sessions_on(model):
                await asyncio.sleep(min(1.0, left))
            else:  # only requests hold it: wait for them, up to the deadline
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(model.idle(), left)
        # Nothing holds it, or its drain is over: from here no acquire succeeds and its
        # sessions end; the requests already running on it finish first.
        model.released = True
        self.on_release(model)
        await model.idle()
        await model.scheduler.close()
        # the ONNX Runtime session's and the heap's memory go back off the loop's thread
        await asyncio.to_thread(_free, model)
        self.retiring.pop(model, None)
        if model.version not in self.models.get(model.name, {}):  # not served again since
            self.metrics.remove_model(model.label)
        log.info("unloaded %s", model.label)

    async def refresh_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 (a moved folder, a full disk: log, keep polling)
                log.exception("looking at the model repository %s failed", self.root)

    # -- lookups --------------------------------------------------------------------------
    def all(self) -> list[LoadedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def versions(self, name: str) -> list[int]:
        return sorted(self.models.get(name, {}))

    def get(self, name: str, version: int, task: str | None = None,
            field_name: str = "model", name_field: str | None = None,
            version_field: str | None = None) -> LoadedModel:
        """The model a request names; errors name the request's fields (`model.name`, or
        `name_field` / `version_field` where a protocol spells them otherwise)."""
        name_field = name_field or f"{field_name}.name"
        version_field = version_field or f"{field_name}.version"
        if not name:
            raise InvalidArgument(name_field, "required")
        if version < 0:
            raise InvalidArgument(version_field, f"must be >= 0, got {version}")
        versions = self.models.get(name)
        if versions is None:
            raise NotFound(f"{name_field}: no model named {shown(name)} (serving: "
                           f"{', '.join(sorted(self.models))})", model=name)
        model = versions.get(version) if version else max(versions.items())[1]
        if model is None:
            raise NotFound(f"{version_field}: model {shown(name)} has no version {version} "
                           f"(serving: {', '.join(map(str, sorted(versions)))}; version "
                           f"policy {self.policy})", model=name)
        if task is not None and model.task != task:
            raise InvalidArgument(name_field, f"model {model.label} is "
                                  f"{TASK_NAMES[model.task]}, not {TASK_NAMES[task]}")
        return model

    def start(self) -> None:
        self.started = True
        for model in self.all():
            model.scheduler.start()

    async def close(self) -> None:
        draining = list(self.retiring)
        for task in self.retiring.values():
            task.cancel()
        await asyncio.gather(*self.retiring.values(), return_exceptions=True)
        for model in [*self.all(), *draining]:
            await model.scheduler.close()  # closing twice is harmless

    # -- model control (the Open Inference Protocol's repository extension) ---------------
    async def index(self) -> list[ModelState]:
        """Every model folder (and every model still served from a folder gone), by name:
        its versions served, retiring and failing, or why none is served."""
        scanned, skipped = await asyncio.to_thread(self._scan)
        entries: dict[str, list[ModelState]] = {}
        for model in self.all():
            entries.setdefault(model.name, []).append(
                ModelState(model.name, str(model.version), "READY"))
        for model in self.retiring:
            if not model.released:
                entries.setdefault(model.name, []).append(ModelState(
                    model.name, str(model.version), "UNLOADING",
                    "retired: serves its open sessions until they end"))
        for (name, version), why in self.unavailable.items():
            entries.setdefault(name, []).append(ModelState(name, str(version), "UNAVAILABLE",
                                                           why))
        folders = set(scanned) | {path.name for path in skipped if path.parent == self.root}
        for name in sorted(folders - entries.keys()):
            if name in self.unloaded:
                why = "unloaded"
            elif name in scanned:
                why = (f"none of its versions ({', '.join(str(v) for v, _ in scanned[name])}) "
                       f"is in the version policy {self.policy}")
            else:
                why = "no version folders"
            entries[name] = [ModelState(name, "", "UNAVAILABLE", why)]
        return [entry for name in sorted(entries)
                for entry in sorted(entries[name], key=lambda e: int(e.version or 0))]

    async def load_model(self, name: str, field_name: str = "model_name") -> list[str]:
        """(Re)reads `name` from its folder: fresh instances of the versions its policy
        takes, each replacing the one served (which retires, its sessions draining as for
        a version removed). Nothing changes unless at least one version loads; returns the
        labels loaded."""
        async with self._changing:
            scanned, _ = await asyncio.to_thread(self._scan)
            if name not in scanned:
                raise NotFound(f"{field_name}: no model folder {shown(name)} with version "
                               f"folders in the repository (models: "
                               f"{', '.join(sorted(scanned))})", model=name)
            fresh: list[LoadedModel] = []
            failed: dict[tuple[str, int, Path], Exception] = {}
            walk = _PolicyWalk(self.policy, {name: scanned[name]})
            for _, version, path in walk:
                try:
                    fresh.append(await asyncio.to_thread(self._load, name, version, path))
                except Exception as error:  # noqa: BLE001 (reported to the client, logged)
                    failed[name, version, path] = error
                    continue
                walk.take()
            self.unavailable = {key: why for key, why in self.unavailable.items()
                                if key[0] != name}
            self.unavailable.update({(n, v): self._reason(e) for (n, v, _), e in failed.items()})
            if not fresh:
                problems = "; ".join(f"{n}/{v}: {self._reason(e)}"
                                     for (n, v, _), e in failed.items())
                raise FailedPrecondition(field_name, f"no version of {shown(name)} loaded "
                                         f"({problems or 'none is in the version policy'}); "
                                         "what was served goes on", "MODEL_LOAD_FAILED")
            # nothing awaits from here on: lookups see the old versions, then the new
            self.unloaded.discard(name)
            for model in list(self.models.get(name, {}).values()):
                self.unload(model)
            for model in fresh:
                self._add(model)
                log.info("loaded %s (requested by a client)", model.label)
            return [model.label for model in fresh]

    async def unload_model(self, name: str, field_name: str = "model_name") -> None:
        """Retires every version of `name` served (sessions drain as for a version
        removed); it stays unloaded, through refreshes, until a load."""
        async with self._changing:
            served = list(self.models.get(name, {}).values())
            if not served and name not in self.unloaded:
                scanned, skipped = await asyncio.to_thread(self._scan)
                if name not in scanned and self.root / name not in skipped:
                    raise NotFound(f"{field_name}: no model named {shown(name)} (serving: "
                                   f"{', '.join(sorted(self.models))})", model=name)
            self.unloaded.add(name)
            self.unavailable = {key: why for key, why in self.unavailable.items()
                                if key[0] != name}
            for model in served:
                self.unload(model)
