"""Experts in Ray actors spread over two simulated nodes: for every tiny MoE architecture, logits equal Hugging
Face eager and 64-token greedy generation is token-identical; with an expert actor killed mid-generation the
output is unchanged (re-sent to a replica when one exists, else after Ray restarts the actor)."""

import threading
import time

import pytest
import ray
import torch
from ray.util.placement_group import remove_placement_group
from transformers import AutoModelForCausalLM

from specserve.actors.experts.hook import experts_modules, install_dispatch
from specserve.actors.experts.ray_transport import RayTransport, start_expert_actors
from tiny_models import MOE_ARCHS, make_tiny_model

pytestmark = pytest.mark.integration
GEN = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.set_experts_implementation("eager")
    return model.eval()


def _with_actors(path, replicated: bool):
    """The model with its experts in two actors: expert e of each layer on actor e % 2, or on both."""
    model = _load(path)
    layers = experts_modules(model)
    n = next(iter(layers.values())).num_experts
    owners = {(layer, e): ([e % 2, 1 - e % 2] if replicated else [e % 2]) for layer in layers for e in range(n)}
    slots = [[s for s, o in owners.items() if a in o] for a in range(2)]
    actors, pg = start_expert_actors(str(path), slots, model.config.hidden_act, num_cpus=0.1)
    transport = RayTransport(actors, owners, timeout_s=10)
    install_dispatch(model, transport)
    return model, transport, actors, pg


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_actors_match_eager(ray_cluster, tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch=arch, seed=21, num_layers=3)
    ref = _load(path)
    model, transport, actors, pg = _with_actors(path, replicated=False)
    try:
        assert len(set(ray.get([a.node_id.remote() for a in actors]))) == 2  # spread over both nodes
        ids = torch.randint(3, 300, (3, 15), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
            prompt = ids[:2, :7]
            assert torch.equal(model.generate(prompt, **GEN), ref.generate(prompt, **GEN))
        counts = transport.token_counts()
        assert all(counts) and all(e % 2 == a for a, c in enumerate(counts) for (_, e) in c)
    finally:
        remove_placement_group(pg)


def _kill_after(transport, actor, calls: int):
    def run():
        while transport.calls < calls:
            time.sleep(0.001)
        ray.kill(actor, no_restart=False)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("replicated", [False, True], ids=["restart", "replica"])
def test_killed_expert_actor_changes_nothing(ray_cluster, tmp_path, replicated):
    path = make_tiny_model(tmp_path / "m", arch="qwen2_moe", seed=22, num_layers=3)
    ref = _load(path)
    model, transport, actors, pg = _with_actors(path, replicated=replicated)
    try:
        prompt = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = ref.generate(prompt, **GEN)
            killer = _kill_after(transport, actors[1], calls=60)
            got = model.generate(prompt, **GEN)
        killer.join(timeout=5)
        assert torch.equal(got, expected)
        if replicated:
            assert transport.resent_to_replica >= 1 and transport.waited_for_restart == 0
        else:
            assert transport.waited_for_restart >= 1
    finally:
        remove_placement_group(pg)
