"""Expert actors autoscaled live (actors/experts/scaling.py, balancer resize): driven by balancer rounds with a
tiny target rate, load grows the actors from 2 to 3 and a quiet period shrinks them back to 2, while greedy
generation goes on and stays token-identical to Hugging Face generate before, during and after each resize; the
removed actor is dead and its placement group removed, and shutdown removes the rest. The actors ask for a
custom resource that only one simulated node offers (experts.resources), and the grown one lands there too."""

import threading
import time

import pytest
import ray
import torch
from ray.exceptions import RayActorError
from ray.util import placement_group_table

from specserve.actors.experts.balancer import ExpertBalancer
from specserve.actors.experts.eplb import static_owners
from specserve.actors.experts.hook import experts_modules, install_dispatch
from specserve.actors.experts.ray_transport import ActorTransport, actor_spec, start_actors
from specserve.actors.experts.scaling import ActorScaler
from specserve.cluster.config import ExpertsConfig
from served_apps import NODE_B
from test_expert_actors import GEN, _load
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration


def _generate_while(round_fn, model, prompt, expected, wait_for=None) -> dict:
    """Run one balancer round on a thread and generate (checking every token) until it is done. `wait_for`:
    hold generation back until it is true (the round has measured a quiet period)."""
    report: dict = {}
    worker = threading.Thread(target=lambda: report.update(round_fn()))
    worker.start()
    while wait_for is not None and not wait_for() and worker.is_alive():
        time.sleep(0.005)
    generations = 0
    with torch.no_grad():
        while worker.is_alive() or generations == 0:  # the switch lands between two steps of a generation
            assert torch.equal(model.generate(prompt, **GEN), expected)
            generations += 1
    worker.join()
    return report


@pytest.mark.timeout(90)
def test_actors_grow_and_shrink_live_with_identical_tokens(ray_cluster, tmp_path):
    path = make_tiny_model(tmp_path / "m", arch="olmoe", seed=25, num_layers=2)
    ref = _load(path)
    model = _load(path)
    layers = experts_modules(model)
    owners = static_owners({layer: m.num_experts for layer, m in layers.items()}, 2)
    spec = actor_spec(str(path), model.config.hidden_act, num_cpus=0.1, resources={NODE_B: 1})
    actors, pg = start_actors(spec, owners, 2)
    transport = ActorTransport(actors, owners, link="channel", timeout_s=10,
                               restart_wait_s=ExpertsConfig().restart_wait_s, spec=spec)
    transport.placement_group = pg
    install_dispatch(model, transport)
    # Any load wants more replicas than 3 actors hold (so: max_actors); no load wants min_actors.
    scaler = ActorScaler(min_actors=2, max_actors=3, target_rows_per_slot_s=1e-3, upscale_delay_s=0,
                         downscale_delay_s=0, redundant_slots=1)
    balancer = ExpertBalancer(transport, transport.experts_per_layer, redundant_slots=1, scaler=scaler)
    prompt = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(7))
    try:
        with torch.no_grad():
            expected = ref.generate(prompt, **GEN)
            assert torch.equal(model.generate(prompt, **GEN), expected)  # before: load for the first round

        grown = _generate_while(balancer.rebalance_once, model, prompt, expected)
        assert grown["scaling"]["target"] == 3 and grown["resized"] and grown["actors"] == 3, grown
        assert len(transport.actors) == len(transport.links) == len(transport.rows_per_actor) == 3
        added, added_pg = transport.actors[2], transport.own_groups[2]
        assert added_pg is not None and transport.own_groups[:2] == [None, None]  # bundles 0, 1 are the first group
        rows = list(transport.rows_per_actor)
        with torch.no_grad():
            assert torch.equal(model.generate(prompt, **GEN), expected)  # after growing
        assert transport.rows_per_actor[2] > rows[2]  # the new actor serves
        (node_b,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and NODE_B in n["Resources"]]
        assert ray.get([a.node_id.remote() for a in transport.actors]) == [node_b] * 3  # pinned, grown one too

        balancer.rebalance_once()  # measures the load just made (steady at 3); the next round sees none
        decided = balancer.last_scaling
        shrunk = _generate_while(balancer.rebalance_once, model, prompt, expected,
                                 wait_for=lambda: balancer.last_scaling is not decided)
        assert shrunk["tokens"] == 0 and shrunk["scaling"]["target"] == 2 and shrunk["actors"] == 2, shrunk
        assert len(transport.actors) == len(transport.rows_per_actor) == 2 and transport.actors_in_use() == 2
        with torch.no_grad():
            assert torch.equal(model.generate(prompt, **GEN), expected)  # after shrinking
        with pytest.raises(RayActorError):
            ray.get(added.ready.remote(), timeout=30)
        assert placement_group_table(added_pg)["state"] == "REMOVED"
        assert transport.placements == 2
    finally:
        transport.shutdown()
    assert placement_group_table(pg)["state"] == "REMOVED"
