"""Expert actors: plain Ray actors, each holding a shard of the physical expert slots of every MoE layer, and the
transport that sends them one message per actor per layer.

Each actor loads only its own experts from the checkpoint (checkpoint.py); Ray restarts an actor that dies and
its constructor reloads its shard (then the transport tells it which slots it holds now, in case a rebalance
moved them). The per-layer messages go over a direct TCP channel to each actor (channel.py; "ray": plain actor
calls, measured slower). The transport groups a layer's experts by the actor chosen for each (the replicas of an
expert take turns, step by step; all of an expert's rows go to one replica, so results do not change), sends all
messages, then collects them. A message whose actor died or timed out is re-sent to other replicas of its experts
when every one of them has one; otherwise the step waits until Ray has restarted the actor and sends it again.
Requests are delayed, never answered wrong. The set of actors can grow and shrink while serving (add_actors,
remove_actors; the balancer decides when), always around a switch of the replica map at a step boundary.
"""

from __future__ import annotations

import collections
import itertools
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specserve.actors.experts.channel import (DEFAULT_MAX_PAYLOAD_BYTES, ChannelKey, ChannelServer, connect,
                                               frame_cap, recv_frame, send_frame)
from specserve.actors.experts.dispatch import ExpertRows, owner_message, scatter_outputs

log = logging.getLogger(__name__)

Slot = tuple[int, int]  # (layer, expert): one physical copy of an expert's weights


class ExpertActor:
    """A Ray actor (see `start_actors`). Its Ray methods and its channel thread share the shard; a lock
    keeps slot changes and token counts consistent with the computation."""

    def __init__(self, model_path: str, slots: list[Slot], hidden_act: str, dtype: str = "float32",
                 torch_threads: int = 1, ffn_shards: int = 0, channel_key: ChannelKey | None = None):
        """`ffn_shards` > 0: the slots are (layer, i) slices of a dense model's MLPs, split that many ways.
        `channel_key`: what a connection to this actor's channel must prove (see channel.py)."""
        from transformers.activations import ACT2FN

        from specserve.actors.experts.expert_shard import ExpertShard
        from specserve.actors.model_loader import resolve_dtype

        self._threads = torch_threads
        torch.set_num_threads(torch_threads)
        self._path, self._dtype, self._ffn_shards = model_path, resolve_dtype(dtype), ffn_shards
        self._lock = threading.Lock()
        self.shard = ExpertShard(self._load({tuple(s) for s in slots}), ACT2FN[hidden_act])
        # Without a key (a caller that only uses the "ray" link) the channel takes no connection at all.
        self._channel = ChannelServer(self._on_message, channel_key or ChannelKey.generate(),
                                      host=ray.util.get_node_ip_address())

    def _load(self, slots: set[Slot]) -> dict:
        from specserve.actors.experts.checkpoint import load_experts, load_ffn_shards

        if self._ffn_shards:
            return load_ffn_shards(self._path, slots, self._ffn_shards, self._dtype)
        return load_experts(self._path, slots, self._dtype)

    def _on_message(self, header: dict, rows: torch.Tensor) -> torch.Tensor:
        return self.run(header["layer"], header["experts"], header["counts"], rows)

    def run(self, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor) -> torch.Tensor:
        if torch.get_num_threads() != self._threads:  # per thread: Ray's and the channel's threads start unset
            torch.set_num_threads(self._threads)
        with self._lock:
            return self.shard.run(layer, experts, counts, rows)

    def channel_address(self) -> tuple[str, int]:
        return self._channel.address

    def hold_slots(self, slots: list[Slot]) -> dict:
        """Hold exactly `slots`: load the missing ones, then drop the others."""
        wanted = {tuple(s) for s in slots}
        loaded = self.load_slots(wanted)
        with self._lock:
            extra = set(self.shard.weights) - wanted
            for s in extra:
                del self.shard.weights[s]
        return {"loaded": loaded, "dropped": len(extra)}

    def load_slots(self, slots) -> int:
        """Add `slots` from the checkpoint (rebalancing, phase 1), reading outside the lock so serving goes on;
        returns how many were loaded."""
        missing = {tuple(s) for s in slots} - set(self.shard.weights)
        loaded = self._load(missing) if missing else {}
        with self._lock:
            self.shard.weights.update(loaded)
        return len(loaded)

    def token_counts(self) -> dict[Slot, int]:
        with self._lock:
            return dict(self.shard.tokens)

    def run_message(self, message: tuple | None) -> torch.Tensor | None:
        """`run` for a compiled graph, which sends every actor a message per layer (None: nothing for it)."""
        return None if message is None else self.run(*message)

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


# Expert actors are named (unique per actor) so that operators' tools and `specserve chaos` can find them.
ACTOR_NAME_PREFIX = "specserve-expert-actor-"
# How long actors may take to read expert weights from the model files: starting with their slots, or loading
# the slots of a new placement.
LOAD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ActorSpec:
    """What every expert actor of a transport starts with (the transport starts more of them when it grows)."""

    model_path: str
    hidden_act: str
    dtype: str = "float32"
    num_cpus: float = 0.25
    torch_threads: int = 1
    ffn_shards: int = 0
    # Custom Ray resources each actor asks for (pins the actors to the nodes that offer them).
    resources: dict[str, float] = field(default_factory=dict)
    # The channel's shared secret and frame cap, made here (by whoever starts the actors), given to every actor
    # and to the transport that connects to them; never logged (its repr hides the token).
    channel_key: ChannelKey = field(default_factory=ChannelKey.generate, repr=False)

    def bundle(self) -> dict[str, float]:
        """One actor's placement-group bundle."""
        return {"CPU": self.num_cpus, **self.resources}

    def start(self, slots: set[Slot], pg, bundle: int):
        """An actor holding `slots`, in bundle `bundle` of placement group `pg` (not waited for)."""
        return ray.remote(ExpertActor).options(
            name=f"{ACTOR_NAME_PREFIX}{uuid.uuid4().hex[:12]}", num_cpus=self.num_cpus,
            resources=dict(self.resources), max_restarts=-1, max_task_retries=0, max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
        ).remote(self.model_path, [list(s) for s in sorted(slots)], self.hidden_act, self.dtype, self.torch_threads,
                 self.ffn_shards, self.channel_key)


def actor_spec(model_path: str, hidden_act: str, *, num_cpus: float, dtype: str = "float32", ffn_shards: int = 0,
               torch_threads: int | None = None, resources: dict[str, float] | None = None,
               max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> ActorSpec:
    """The actors use the caller's torch thread count unless told otherwise: CPU matmul kernels split work by
    thread count, and on some CPUs the bits then differ from the same model run in the caller. A new channel
    key (secret) for every spec; `max_payload_bytes`: its frame cap (see channel.frame_cap)."""
    return ActorSpec(model_path, hidden_act, dtype, num_cpus, torch_threads or torch.get_num_threads(), ffn_shards,
                     dict(resources or {}), ChannelKey.generate(max_payload_bytes))


def start_actors(spec: ActorSpec, owners: dict[Slot, list[int]], num_actors: int, *,
                 spread: bool = True) -> tuple[list, object]:
    """`num_actors` actors, actor a holding every (layer, expert) whose owners include a, in a placement group
    that spreads them over nodes (SPREAD: best effort). Returns (actors, placement group); remove the group to
    free them."""
    pg = placement_group([spec.bundle()] * num_actors, strategy="SPREAD" if spread else "PACK")
    ray.get(pg.ready(), timeout=120)
    actors = [spec.start(slots, pg, a) for a, slots in enumerate(slots_of_actors(owners, num_actors))]
    ray.get([a.ready.remote() for a in actors], timeout=LOAD_TIMEOUT_S)
    return actors, pg


def slots_of_actors(owners: dict[Slot, list[int]], num_actors: int) -> list[set[Slot]]:
    out: list[set[Slot]] = [set() for _ in range(num_actors)]
    for slot, actors in owners.items():
        for a in actors:
            out[a].add(slot)
    return out


class ActorUnavailable(Exception):
    """The actor died, timed out, or failed the request: send its rows elsewhere or wait for its restart."""


class ExpertsUnavailable(RuntimeError):
    """A layer's experts stayed unreachable for the transport's restart_wait_s: the engine step fails (its
    requests get an error) instead of waiting on."""


class ActorCallLink:
    """Per-layer messages as plain actor calls (Ray's own connections: no channel key)."""

    def __init__(self, actor, key: ChannelKey | None = None):
        self.actor = actor
        self._ref = None

    def open(self, timeout_s: float) -> None:
        pass

    def send(self, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor) -> None:
        self._ref = self.actor.run.remote(layer, experts, counts, rows.cpu())

    def receive(self, timeout_s: float) -> torch.Tensor:
        try:
            return ray.get(self._ref, timeout=timeout_s)
        except (RayActorError, GetTimeoutError) as exc:
            raise ActorUnavailable(type(exc).__name__) from exc

    def close(self) -> None:
        self._ref = None


class ChannelLink:
    """Per-layer messages over the actor's TCP channel; the address comes from Ray on (re)connect."""

    def __init__(self, actor, key: ChannelKey | None = None):
        if key is None:
            raise ValueError("the channel link needs the actors' channel key (ActorSpec.channel_key)")
        self.actor = actor
        self.key = key
        self.sock: socket.socket | None = None
        self._send_error: Exception | None = None

    def open(self, timeout_s: float) -> None:
        if self.sock is None:
            try:
                address = ray.get(self.actor.channel_address.remote(), timeout=timeout_s)
                self.sock = connect(address, self.key, timeout_s)
            except (RayActorError, GetTimeoutError, OSError) as exc:
                raise ActorUnavailable(type(exc).__name__) from exc

    def send(self, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor) -> None:
        try:
            send_frame(self.sock, {"layer": layer, "experts": experts, "counts": counts}, rows,
                       self.key.max_payload_bytes)
        except OSError as exc:  # reported by receive, so a send failure takes the same path as a lost reply
            self._send_error = exc

    def receive(self, timeout_s: float) -> torch.Tensor:
        try:
            if self._send_error is not None:
                raise self._send_error
            self.sock.settimeout(timeout_s)
            header, out = recv_frame(self.sock, self.key.max_payload_bytes)
        except (OSError, ConnectionError) as exc:
            self.close()
            raise ActorUnavailable(type(exc).__name__) from exc
        if "error" in header:
            self.close()
            raise ActorUnavailable(header["error"])
        return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self._send_error = None


LINKS = {"channel": ChannelLink, "ray": ActorCallLink}


@dataclass
class PendingLayer:
    """One MoE layer's dispatch in flight (between `start` and `finish`)."""

    layer: int
    plan: list[ExpertRows]
    rows: torch.Tensor
    counts: list[int]
    step: int
    offsets: list[int]
    deadline: float = float("inf")  # monotonic time by which the layer must be done (restart_wait_s)
    groups: dict[int, list[int]] = field(default_factory=dict)  # actor -> plan positions sent to it


def _dispose(links: list, handles: list, groups: list) -> None:
    """Close the links, end the actors for good, and remove their own placement groups (None: a bundle of a
    group shared with others, left as it is)."""
    from ray.util.placement_group import remove_placement_group

    for link in links:
        link.close()
    for h in handles:
        ray.kill(h, no_restart=True)
    for pg in groups:
        if pg is not None:
            remove_placement_group(pg)


class ActorTransport:
    def __init__(self, actors: list, replicas: dict[Slot, list[int]], *, link: str, timeout_s: float,
                 restart_wait_s: float, spec: ActorSpec | None = None, channel_key: ChannelKey | None = None):
        """`replicas`: (layer, expert) -> indices of the actors holding it (first is preferred). `spec`: how to
        start more actors (add_actors; None: the actor count is fixed). A layer that cannot be completed within
        `restart_wait_s` (re-sends, waiting for a restart) raises ExpertsUnavailable. `channel_key`: the actors'
        (default: the spec's), which the "channel" link needs."""
        if link not in LINKS:
            raise ValueError(f"experts.transport must be one of {sorted(LINKS)}, not {link!r}")
        self.actors = list(actors)
        self.link = link
        self.spec = spec
        self.channel_key = channel_key or (spec.channel_key if spec is not None else None)
        self.links = [LINKS[link](a, self.channel_key) for a in actors]
        self.replicas = replicas
        self.first_layer = min(layer for layer, _ in replicas)
        self.last_layer = max(layer for layer, _ in replicas)
        self._in_step = False  # between a step's first layer and the end of its last: the maps are in use
        self.experts_per_layer = dict(collections.Counter(layer for layer, _ in replicas))
        self.timeout_s = timeout_s
        self.restart_wait_s = restart_wait_s
        self._step = 0
        self._next_replicas: dict[Slot, list[int]] | None = None
        self._switched = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0
        self.rows_per_actor = [0] * len(self.actors)  # token rows sent, per actor (a metric)
        self.resent_to_replica = 0
        self.waited_for_restart = 0
        self.placements = 0  # placement switches applied
        self._down: set[int] = set()
        self._reopening = [threading.Lock() for _ in actors]  # grows with the actors, never shrinks
        self._closed = threading.Event()
        self.placement_group = None  # set by whoever started the actors in one; removed by shutdown()
        self.own_groups: list = [None] * len(actors)  # per actor: the group add_actors made for it, if any
        for link in self.links:
            link.open(timeout_s)

    # -- rebalancing: the balancer loads new slots, proposes the map, waits for the switch, frees old slots --

    def propose(self, replicas: dict[Slot, list[int]]) -> threading.Event:
        """Use `replicas` from the next step on (the actors already hold its slots); the event is set once no
        step uses the old map any more: at once between steps (an idle verifier must be able to shrink too),
        else at the next step boundary."""
        with self._lock:
            self._next_replicas = replicas
            self._switched = threading.Event()
            switched = self._switched
            if not self._in_step:
                self._switch()
            return switched

    def withdraw(self, replicas: dict[Slot, list[int]]) -> bool:
        """Cancel a proposal that has not been switched to yet (True if it was still pending)."""
        with self._lock:
            if self._next_replicas is replicas:
                self._next_replicas = None
                return True
            return False

    def _step_boundary(self) -> None:
        self._step += 1
        with self._lock:
            self._in_step = True
            self._switch()

    def _switch(self) -> None:  # under _lock, with no step using the maps
        if self._next_replicas is not None:
            self.replicas, self._next_replicas = self._next_replicas, None
            self.placements += 1
            self._switched.set()

    def slots_of(self, actor: int) -> list[Slot]:
        with self._lock:
            maps = [self.replicas] + ([self._next_replicas] if self._next_replicas else [])
        return sorted({s for m in maps for s, owners in m.items() if actor in owners})

    # -- dispatch --

    def _owner(self, layer: int, expert: int, step: int) -> int | None:
        """This step's replica of the expert among the live ones (the replicas take turns, step by step; offset
        by expert so hot experts sharing actors do not all pick the same one in a step)."""
        options = [a for a in self.replicas[(layer, expert)] if a not in self._down]
        return options[(step + expert) % len(options)] if options else None

    def _send(self, pending: PendingLayer, positions: list[int]) -> None:
        groups: dict[int, list[int]] = {}  # becomes pending.groups once every owner is known (may raise)
        for p in positions:
            owner = self._owner(pending.layer, pending.plan[p].expert, pending.step)
            if owner is None:  # every replica is down: wait for this step's choice to come back
                expert = pending.plan[p].expert
                replicas = self.replicas[(pending.layer, expert)]
                owner = replicas[(pending.step + expert) % len(replicas)]
                self.waited_for_restart += 1
                self._reopen(owner, pending.deadline)
            groups.setdefault(owner, []).append(p)
        pending.groups = groups
        for actor, group in groups.items():
            experts, n, part = owner_message(pending.plan, pending.rows, pending.counts, group,
                                             [pending.offsets[p] for p in group])
            self.links[actor].send(pending.layer, experts, n, part)
            self.calls += 1
            self.rows_per_actor[actor] += int(part.shape[0])

    def start(self, layer: int, plan: list[ExpertRows], rows: torch.Tensor, counts: list[int]) -> PendingLayer:
        if layer == self.first_layer:
            self._step_boundary()
        pending = PendingLayer(layer, plan, rows, counts, self._step,
                               list(itertools.accumulate([0] + counts[:-1])),
                               deadline=time.monotonic() + self.restart_wait_s)
        try:
            self._send(pending, list(range(len(plan))))
        except BaseException:
            self._abandon(pending, set())  # nothing was sent unless pending.groups is set
            raise
        return pending

    def finish(self, pending: PendingLayer) -> list[torch.Tensor]:
        outputs: list[torch.Tensor | None] = [None] * len(pending.plan)
        answered: set[int] = set()  # actors of the current round whose reply has been read (or lost)
        try:
            while True:
                failed: list[int] = []
                answered = set()
                for actor, positions in pending.groups.items():
                    try:
                        out = self.links[actor].receive(self._receive_timeout(pending))
                    except ActorUnavailable as exc:
                        answered.add(actor)
                        log.warning("expert actor %d failed on layer %d (%s); re-sending its rows", actor,
                                    pending.layer, exc)
                        self._mark_down(actor)
                        failed += positions
                        continue
                    answered.add(actor)
                    scatter_outputs(outputs, positions, pending.counts, out.to(pending.rows.device))
                if not failed:
                    if pending.layer == self.last_layer:
                        with self._lock:
                            self._in_step = False
                    return outputs
                if time.monotonic() >= pending.deadline:
                    actors = sorted({a for a, ps in pending.groups.items() if set(ps) & set(failed)})
                    raise ExpertsUnavailable(f"layer {pending.layer}: expert actors {actors} did not answer within "
                                             f"{self.restart_wait_s:g}s (experts.restart_wait_s)")
                if all(self._owner(pending.layer, pending.plan[p].expert, pending.step) is not None
                       for p in failed):
                    self.resent_to_replica += 1
                answered = set(pending.groups)  # _send below starts a new round (it raises before sending)
                self._send(pending, failed)
        except BaseException:
            self._abandon(pending, answered)
            raise

    def _receive_timeout(self, pending: PendingLayer) -> float:
        """A reply is waited for timeout_s, or what is left of the layer's budget if less (at least a moment)."""
        return max(0.05, min(self.timeout_s, pending.deadline - time.monotonic()))

    def _abandon(self, pending: PendingLayer, answered: set[int]) -> None:
        """The layer failed (the step does too): a connection with a reply still on its way would hand that
        reply to the next step, so it is closed and reopened; the step is over for the replica map."""
        for actor in set(pending.groups) - answered:
            self._mark_down(actor)
        with self._lock:
            self._in_step = False
            self._switch()

    def run(self, layer: int, plan: list[ExpertRows], rows: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        return self.finish(self.start(layer, plan, rows, counts))

    # -- failure: a failed actor is down (skipped while a replica can serve) until it answers again --

    def _mark_down(self, actor: int) -> None:
        self.links[actor].close()
        with self._lock:
            if actor in self._down:
                return
            self._down.add(actor)
        threading.Thread(target=self._reopen_quietly, args=(actor,), name=f"expert-reopen-{actor}",
                         daemon=True).start()

    def _reopen_quietly(self, actor: int) -> None:
        try:
            self._reopen(actor)
        except RuntimeError as exc:  # shut down, or gone for restart_wait_s: a step that needs it will say so
            log.warning("expert actor %d not reopened: %s", actor, exc)

    def _reopen(self, actor: int, deadline: float | None = None) -> None:
        """Wait until the actor answers again (Ray restarts it), make it hold its current slots (its constructor
        reloaded the ones it started with), and reconnect. Raises ExpertsUnavailable if it is still away at
        `deadline` (default: restart_wait_s from now)."""
        if deadline is None:
            deadline = time.monotonic() + self.restart_wait_s
        gone = f"expert actor {actor} unavailable for {self.restart_wait_s:g}s (experts.restart_wait_s)"
        # Another thread may be reopening it already (waiting its own deadline): wait for it only until ours.
        if not self._reopening[actor].acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ExpertsUnavailable(gone)
        try:
            while True:
                with self._lock:  # remove_actors takes removed actors out of _down (and the lists) under it
                    if actor not in self._down:
                        return
                    handle, link = self.actors[actor], self.links[actor]
                if self._closed.is_set() or not ray.is_initialized():
                    raise RuntimeError("expert transport shut down")
                wait = max(0.05, min(self.timeout_s, deadline - time.monotonic()))
                try:
                    ray.get(handle.hold_slots.remote(self.slots_of(actor)), timeout=wait)
                    link.open(wait)
                    with self._lock:
                        self._down.discard(actor)
                except (RayActorError, GetTimeoutError, ActorUnavailable) as exc:
                    if time.monotonic() > deadline:
                        raise ExpertsUnavailable(gone) from exc
                    time.sleep(0.2)
        finally:
            self._reopening[actor].release()

    def token_counts(self) -> list[dict[Slot, int]]:
        return ray.get([a.token_counts.remote() for a in self.actors], timeout=self.timeout_s)

    # -- resizing (one resizer at a time: the balancer thread). Growing appends actors no map names yet; the
    # balancer then proposes a map that uses them. Shrinking removes actors once the map in use names none. The
    # engine thread only indexes actors its current map names, so the lists change in place, under _lock. --

    def add_actors(self, slots: list[set[Slot]], ready_timeout_s: float = LOAD_TIMEOUT_S) -> list[int]:
        """Start one actor per entry of `slots`, holding those, and connect to them; returns their indices.
        Actor i goes into bundle i of the first placement group while that group has one (its actor was
        removed), else into a one-bundle group of its own."""
        if self.spec is None:
            raise RuntimeError("this transport was made without an ActorSpec: it cannot start actors")
        first = len(self.actors)
        shared = self.placement_group.bundle_count if self.placement_group is not None else 0
        handles, owned, links = [], [], []  # owned: per new actor, its own group (None: a bundle of the first)
        try:
            for i, held in enumerate(slots, start=first):
                pg = placement_group([self.spec.bundle()]) if i >= shared else None
                owned.append(pg)
                if pg is not None:
                    ray.get(pg.ready(), timeout=ready_timeout_s)  # unplaceable: demand for Ray's autoscaler
                handles.append(self.spec.start(held, self.placement_group, i) if pg is None
                               else self.spec.start(held, pg, 0))
            ray.get([h.ready.remote() for h in handles], timeout=ready_timeout_s)
            for h in handles:
                links.append(LINKS[self.link](h, self.channel_key))
                links[-1].open(self.timeout_s)
        except Exception:
            _dispose(links, handles, owned)
            raise
        with self._lock:
            self.actors.extend(handles)
            self.links.extend(links)
            self.own_groups.extend(owned)
            self.rows_per_actor.extend([0] * len(handles))
            while len(self._reopening) < len(self.actors):
                self._reopening.append(threading.Lock())
        return list(range(first, first + len(handles)))

    def actors_in_use(self) -> int:
        """How many actors the map in use and the proposed one span (1 + the highest index they name)."""
        with self._lock:
            return self._in_use()

    def _in_use(self) -> int:
        maps = [self.replicas] + ([self._next_replicas] if self._next_replicas else [])
        return 1 + max(a for m in maps for owners in m.values() for a in owners)

    def remove_actors(self, keep: int) -> list:
        """Remove every actor from index `keep` on: close its link, kill it, remove its own placement group.
        The map in use (and any proposed) must name none of them: propose one without them and wait for the
        switch first. Returns the removed actor handles."""
        with self._lock:
            if self._in_use() > keep:
                raise RuntimeError(f"the expert map still uses actors from {keep} on: switch it first")
            handles, links, groups = self.actors[keep:], self.links[keep:], self.own_groups[keep:]
            for lst in (self.actors, self.links, self.own_groups, self.rows_per_actor):
                del lst[keep:]
            self._down -= set(range(keep, keep + len(handles)))  # their reopen threads, if any, give up
        _dispose(links, handles, groups)
        return handles

    def shutdown(self) -> None:
        """Close the links, stop reconnecting, and remove the actors' placement groups (which ends them)."""
        from ray.util.placement_group import remove_placement_group

        self._closed.set()
        for link in self.links:
            link.close()
        for pg in [self.placement_group] + self.own_groups:
            if pg is not None:
                remove_placement_group(pg)
        self.placement_group = None
        self.own_groups = [None] * len(self.own_groups)


def attach_expert_actors(model: torch.nn.Module, model_path: str, num_actors: int, *, num_cpus: float, link: str,
                         timeout_s: float, restart_wait_s: float, shard_dense_ffn: bool,
                         resources: dict[str, float] | None = None,
                         max_tokens_per_step: int | None = None) -> ActorTransport | None:
    """Move `model`'s experts into `num_actors` new expert actors (owned by the caller; expert e of every layer on
    actor e % num_actors) and route its MoE layers through them. A dense model's MLPs instead, split into
    `num_actors` slices, if `shard_dense_ffn`. None if there is nothing to move."""
    from specserve.actors.experts.eplb import static_owners
    from specserve.actors.experts.hook import experts_modules, install_dispatch, install_ffn_dispatch, mlp_modules

    layers = experts_modules(model)
    ffn = 0
    if layers:
        owners = static_owners({layer: m.num_experts for layer, m in layers.items()}, num_actors)
        dtype = next(iter(layers.values())).gate_up_proj.dtype
    elif shard_dense_ffn and mlp_modules(model):
        layers, ffn = mlp_modules(model), num_actors
        owners = {(layer, i): [i] for layer in layers for i in range(num_actors)}
        dtype = next(iter(layers.values())).down_proj.weight.dtype
    else:
        return None
    text = model.config.get_text_config()
    cap = DEFAULT_MAX_PAYLOAD_BYTES
    if max_tokens_per_step:  # a token's rows: one per chosen expert (MoE), one per shard's slice (dense)
        rows = ffn or getattr(text, "num_experts_per_tok", None) or getattr(text, "moe_topk", None) or 8
        cap = frame_cap(max_tokens_per_step, int(rows), text.hidden_size, dtype.itemsize)
    spec = actor_spec(model_path, text.hidden_act, dtype=str(dtype).removeprefix("torch."), num_cpus=num_cpus,
                      ffn_shards=ffn, resources=resources, max_payload_bytes=cap)
    actors, pg = start_actors(spec, owners, num_actors)
    transport = ActorTransport(actors, owners, link=link, timeout_s=timeout_s, restart_wait_s=restart_wait_s,
                               spec=None if ffn else spec, channel_key=spec.channel_key)
    transport.placement_group = pg
    transport.ffn_shards = ffn
    if ffn:
        install_ffn_dispatch(model, transport, ffn)
    else:
        install_dispatch(model, transport)
    log.info("%s of %d layers in %d expert actors (%s link)", "MLP shards" if ffn else "experts", len(layers),
             num_actors, link)
    return transport
