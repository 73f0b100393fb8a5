"""What the driver ships to Ray workers so they rebuild its exact model: architecture name and
the state dict as NumPy arrays (through the object store), and how many GPUs an actor takes; how a
stage spreads its units of work over the cluster (:func:`ordered_map` for tasks, :func:`actor_map`
for a pool of actors), results in order, failing with :class:`StageStalled` when nothing moves."""
from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from oodlib.models import ModelAdapter, build_model


@dataclass(frozen=True)
class ModelSpec:
    """What an actor needs to rebuild the driver's model exactly: architecture + state dict ref,
    the device to run on, and the EMBED extras (:class:`jobs.extras.ExtraSpec`) to compute."""

    name: str
    num_classes: int
    state: object  # ray.ObjectRef to {param name: np.ndarray}, or the dict itself
    device: str = "auto"
    extras: tuple = ()
    max_image_bytes: int = 64 * 2**20
    preprocess: object = None  # oodlib.data.preprocess.Preprocess: how images become input


def model_state_arrays(model: ModelAdapter) -> dict[str, np.ndarray]:
    """The model's state dict as NumPy arrays (what the driver ships to actors)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def rebuild_model(name: str, num_classes: int, state: dict[str, np.ndarray], device: torch.device, preprocess=None) -> ModelAdapter:
    """Architecture ``name`` with the shipped weights (and preprocessing), in eval mode on ``device``."""
    model = build_model(name, num_classes, preprocess)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.to(device).eval()


def fetch(ref):
    """The value behind an object-store reference (or the value itself). Ray is not imported for
    a plain value: importing it reads its auth settings, which must wait for :func:`init_ray`."""
    ray = sys.modules.get("ray")
    return ray.get(ref) if ray is not None and isinstance(ref, ray.ObjectRef) else ref


def gpus_per_actor(requested: str | float) -> float:
    """GPUs per actor: ``auto`` → 1 when the Ray cluster has GPUs, else 0.

    A request for GPUs on a cluster without any fails at once (Ray would otherwise wait ~30 min).
    """
    import ray

    available = ray.cluster_resources().get("GPU", 0.0)
    if requested == "auto":
        return 1.0 if available >= 1 else 0.0
    if requested > 0 and available < requested:
        raise RuntimeError(
            f"embed.num_gpus_per_actor={requested} but the Ray cluster has {available:g} GPUs; "
            "set it to 0 or 'auto', or add GPU workers"
        )
    return float(requested)


class StageStalled(RuntimeError):
    """No unit of a stage's work finished within the configured stall timeout."""


def stalled(what: str, stall_timeout_s: float, done: str, needs: str) -> StageStalled:
    """The error of a stage in which nothing finished for ``stall_timeout_s`` seconds: how far it
    got (``done``), what a unit needs, and the cluster's resources, total and free."""
    import ray

    return StageStalled(f"{what}: no progress for {stall_timeout_s:g} s ({done}); the cluster has {ray.cluster_resources()} "
                        f"and {ray.available_resources()} free — {needs} (runtime.stall_timeout_s sets the limit)")


def cluster_cpus() -> int:
    """CPUs of the Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def ordered_map(submit, items: list, window: int, stall_timeout_s: float | None, what: str, progress=None):
    """Yield ``ray.get(submit(item))`` for every item, **in the items' order**, with at most
    ``window`` submitted and not yet yielded (bounded driver memory; deterministic reductions
    merge in this order whatever order the cluster finishes in).

    Raises :class:`StageStalled` when none of the running units finishes for ``stall_timeout_s``
    seconds (e.g. a cluster without the CPUs the tasks wait for), naming the cluster's resources.
    ``progress(done, total)`` is called after each unit.
    """
    import ray

    pending: dict[int, object] = {}
    nxt = 0
    for i in range(len(items)):
        while nxt < len(items) and len(pending) < window:
            pending[nxt] = submit(items[nxt])
            nxt += 1
        ref = pending.pop(i)
        ready, _ = ray.wait([ref], timeout=stall_timeout_s)
        if not ready:
            for r in [ref, *pending.values()]:
                try:
                    ray.cancel(r)
                except Exception:  # best effort: the job fails either way
                    pass
            raise stalled(what, stall_timeout_s, f"{i} of {len(items)} done", "each unit needs 1 CPU")
        yield ray.get(ref)
        if progress is not None:
            progress(i + 1, len(items))


def actor_map(make_actor, call, items: list, num_actors: int, stall_timeout_s: float | None, what: str,
              progress=None, max_attempts: int = 3):
    """Yield the result of ``call(actor, item)`` (an ObjectRef) for every item, **in the items'
    order**, on a pool of ``num_actors`` actors from ``make_actor()`` that survives losing actors.

    - Work goes only to actors that are up: an actor placed on a node that died before Ray noticed,
      or one that waits for a CPU another actor of the pool holds, never holds an item back.
    - An item whose actor dies (its node lost, the process killed) runs again on another actor,
      at most ``max_attempts`` times in all; a replacement actor is started for each one lost (up
      to ``num_actors`` replacements in all).
    - An actor whose constructor raises, or an item whose call raises, fails the map at once (a bug,
      not a lost node). Each actor has at most two items in flight, the pool ``2 * num_actors``
      items submitted and not yet yielded (bounded driver memory).
    - :class:`StageStalled` when nothing finishes or comes up for ``stall_timeout_s`` seconds.
    All actors are killed when the map ends, however it ends.
    """
    import ray
    from ray.exceptions import RayActorError

    booting: dict = {}  # __ray_ready__ ref → actor not yet up
    up: dict = {}  # actor → items in flight on it
    inflight: dict = {}  # result ref → (item index, actor)
    done: dict[int, object] = {}
    attempts = [0] * len(items)
    todo = deque(range(len(items)))  # not yet submitted, in order (a lost item goes back to the front)
    replacements = num_actors

    def start_actor():
        actor = make_actor()
        booting[actor.__ray_ready__.remote()] = actor

    def lose(actor) -> None:
        nonlocal replacements
        up.pop(actor, None)
        ray.kill(actor)
        if replacements > 0:
            replacements -= 1
            start_actor()

    for _ in range(num_actors):
        start_actor()
    try:
        nxt = 0
        while nxt < len(items):
            for actor in sorted(up, key=up.get):  # the least loaded first
                while todo and up[actor] < 2 and len(inflight) + len(done) < 2 * num_actors:
                    i = todo.popleft()
                    attempts[i] += 1
                    inflight[call(actor, items[i])] = (i, actor)
                    up[actor] += 1
            if not inflight and not booting:
                raise RuntimeError(f"{what}: every actor was lost ({nxt} of {len(items)} done)")
            ready, _ = ray.wait([*inflight, *booting], num_returns=1, timeout=stall_timeout_s)
            if not ready:
                raise stalled(what, stall_timeout_s, f"{nxt} of {len(items)} done, {len(up)} actors up, "
                              f"{len(booting)} not yet placed", "each actor needs 1 CPU")
            ref = ready[0]
            if ref in booting:
                actor = booting.pop(ref)
                try:
                    ray.get(ref)
                    up[actor] = 0
                except RayActorError as exc:
                    if exc.actor_init_failed:
                        raise
                    lose(actor)
                continue
            i, actor = inflight.pop(ref)
            try:
                done[i] = ray.get(ref)
                up[actor] -= 1
            except RayActorError as exc:
                if attempts[i] >= max_attempts:
                    raise RuntimeError(f"{what}: item {i} lost its actor {attempts[i]} times: {exc}") from exc
                todo.appendleft(i)
                if actor in up:
                    lose(actor)
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1
                if progress is not None:
                    progress(nxt, len(items))
    finally:
        for actor in [*up, *booting.values()]:
            ray.kill(actor)
