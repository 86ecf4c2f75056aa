"""Expert actors: plain Ray actors, each holding a shard of the physical expert slots of every MoE layer, and the
transport that sends them one message per actor per layer.

Each actor loads only its own experts from the checkpoint (checkpoint.py); Ray restarts an actor that dies and
its constructor reloads the same shard. The transport groups a layer's experts by the actor chosen for each
(the replicas of an expert take turns, step by step; all of an expert's rows go to one replica, so results do not
change), sends all messages, then collects them. A message whose actor died or timed out is re-sent to other
replicas of its experts when every one of them has one; otherwise the step waits until Ray has restarted the actor
and sends it again. Requests are delayed, never answered wrong.
"""

from __future__ import annotations

import itertools
import logging
import time

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specserve.actors.experts.dispatch import ExpertRows, owner_message, scatter_outputs, split_by_owner

log = logging.getLogger(__name__)


class ExpertActor:
    """A Ray actor (see `start_expert_actors`): sync, so its torch work runs on one thread."""

    def __init__(self, model_path: str, slots: list[tuple[int, int]], hidden_act: str, dtype: str = "float32",
                 torch_threads: int = 1, ffn_shards: int = 0):
        """`ffn_shards` > 0: the slots are (layer, i) slices of a dense model's MLPs, split that many ways."""
        from transformers.activations import ACT2FN

        from specserve.actors.experts.checkpoint import load_experts, load_ffn_shards
        from specserve.actors.experts.expert_shard import ExpertShard

        from specserve.actors.model_loader import resolve_dtype

        torch.set_num_threads(torch_threads)
        wanted = {tuple(s) for s in slots}
        weights = (load_ffn_shards(model_path, wanted, ffn_shards, resolve_dtype(dtype)) if ffn_shards
                   else load_experts(model_path, wanted, resolve_dtype(dtype)))
        self.shard = ExpertShard(weights, ACT2FN[hidden_act])

    def run(self, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor) -> torch.Tensor:
        return self.shard.run(layer, experts, counts, rows)

    def token_counts(self) -> dict[tuple[int, int], int]:
        return dict(self.shard.tokens)

    def run_message(self, message: tuple | None) -> torch.Tensor | None:
        """`run` for a compiled graph, which sends every actor a message per layer (None: nothing for it)."""
        return None if message is None else self.shard.run(*message)

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def start_expert_actors(model_path: str, owners: dict[tuple[int, int], list[int]], num_actors: int,
                        hidden_act: str, dtype: str = "float32", num_cpus: float = 0.25, spread: bool = True,
                        ffn_shards: int = 0) -> tuple[list, object]:
    """`num_actors` actors, actor a holding every (layer, expert) whose owners include a, in a placement group
    that spreads them over nodes (SPREAD: best effort). Returns (actors, placement group); remove the group to
    free them."""
    slots_per_actor = [[s for s, o in owners.items() if a in o] for a in range(num_actors)]
    pg = placement_group([{"CPU": num_cpus}] * len(slots_per_actor), strategy="SPREAD" if spread else "PACK")
    ray.get(pg.ready(), timeout=120)
    actors = []
    for i, slots in enumerate(slots_per_actor):
        actors.append(ray.remote(ExpertActor).options(
            num_cpus=num_cpus, max_restarts=-1, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(model_path, [list(s) for s in slots], hidden_act, dtype, 1, ffn_shards))
    ray.get([a.ready.remote() for a in actors], timeout=300)
    return actors, pg


class RayTransport:
    def __init__(self, actors: list, replicas: dict[tuple[int, int], list[int]], *, timeout_s: float = 30.0,
                 restart_wait_s: float = 300.0):
        """`replicas`: (layer, expert) -> indices of the actors holding it (first is preferred)."""
        self.actors = actors
        self.replicas = replicas
        self.timeout_s = timeout_s
        self.restart_wait_s = restart_wait_s
        self._turn = itertools.count()
        self.calls = 0
        self.resent_to_replica = 0
        self.waited_for_restart = 0

    def _owner(self, layer: int, expert: int, step: int, avoid: set[int] = frozenset()) -> int | None:
        options = [a for a in self.replicas[(layer, expert)] if a not in avoid]
        return options[step % len(options)] if options else None

    def run(self, layer: int, plan: list[ExpertRows], rows: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        step = next(self._turn)
        offsets = list(itertools.accumulate([0] + counts[:-1]))
        outputs: list[torch.Tensor | None] = [None] * len(plan)
        pending = list(range(len(plan)))
        avoid: set[int] = set()
        deadline = time.monotonic() + self.restart_wait_s
        while pending:
            groups: dict[int, list[int]] = {}
            for p in pending:
                owner = self._owner(layer, plan[p].expert, step, avoid)
                if owner is None:  # no live replica left: wait for the first choice to come back
                    owner = self._owner(layer, plan[p].expert, step)
                groups.setdefault(owner, []).append(p)
            refs = {}
            for actor, positions in groups.items():
                experts, n, part = owner_message(plan, rows, counts, positions, [offsets[p] for p in positions])
                refs[actor] = self.actors[actor].run.remote(layer, experts, n, part.cpu())
                self.calls += 1
            pending = []
            for actor, ref in refs.items():
                positions = groups[actor]
                try:
                    out = ray.get(ref, timeout=self.timeout_s)
                except (RayActorError, GetTimeoutError) as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"expert actor {actor} unavailable for {self.restart_wait_s:.0f}s") from exc
                    log.warning("expert actor %d failed on layer %d (%s); re-sending", actor, layer,
                                type(exc).__name__)
                    if all(self._owner(layer, plan[p].expert, step, avoid | {actor}) is not None for p in positions):
                        self.resent_to_replica += 1
                    else:
                        self.waited_for_restart += 1
                        self._wait_alive(actor, deadline)
                    avoid.add(actor)
                    pending += positions
                    continue
                scatter_outputs(outputs, positions, counts, out.to(rows.device))
            if pending and all(self._owner(layer, plan[p].expert, step, avoid) is None for p in pending):
                avoid.clear()  # only restarted actors can serve these: try them again
        return outputs

    def _wait_alive(self, actor: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                ray.get(self.actors[actor].ready.remote(), timeout=5)
                return
            except (RayActorError, GetTimeoutError):
                time.sleep(0.2)

    def token_counts(self) -> list[dict[tuple[int, int], int]]:
        return ray.get([a.token_counts.remote() for a in self.actors])


class CompiledGraphTransport:
    """One Ray Compiled Graph over the actors: each layer's messages go out and come back through channels set
    up once, instead of a task submission per call. Every actor gets a message every layer (None if it has no
    rows). No failover yet: a dead actor breaks the graph, so serving uses RayTransport; bench-experts compares."""

    def __init__(self, actors: list, replicas: dict[tuple[int, int], list[int]]):
        from ray.dag import InputNode, MultiOutputNode

        self.actors = actors
        self.replicas = replicas
        with InputNode() as inp:
            dag = MultiOutputNode([a.run_message.bind(inp[i]) for i, a in enumerate(actors)])
        self.graph = dag.experimental_compile()
        self.calls = 0

    def run(self, layer: int, plan: list[ExpertRows], rows: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor | None] = [None] * len(plan)
        groups = split_by_owner(plan, counts, lambda e: self.replicas[(layer, e)][0])
        messages: list[tuple | None] = [None] * len(self.actors)
        for actor, (positions, offsets) in groups.items():
            experts, n, part = owner_message(plan, rows, counts, positions, offsets)
            messages[actor] = (layer, experts, n, part.cpu())
        replies = ray.get(self.graph.execute(*messages))
        self.calls += 1
        for actor, (positions, _) in groups.items():
            scatter_outputs(outputs, positions, counts, replies[actor].to(rows.device))
        return outputs

    def teardown(self) -> None:
        self.graph.teardown()


def attach_expert_actors(model: torch.nn.Module, model_path: str, num_actors: int, *, num_cpus: float = 0.25,
                         timeout_s: float = 30.0, shard_dense_ffn: bool = False) -> RayTransport | None:
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
    hidden_act = model.config.get_text_config().hidden_act
    actors, pg = start_expert_actors(model_path, owners, num_actors, hidden_act,
                                     dtype=str(dtype).removeprefix("torch."), num_cpus=num_cpus, ffn_shards=ffn)
    transport = RayTransport(actors, owners, timeout_s=timeout_s)
    transport.placement_group = pg
    if ffn:
        install_ffn_dispatch(model, transport, ffn)
    else:
        install_dispatch(model, transport)
    log.info("%s of %d layers in %d expert actors", "MLP shards" if ffn else "experts", len(layers), num_actors)
    return transport
