"""Experts in Ray actors spread over two simulated nodes: for every tiny MoE architecture, logits equal Hugging
Face eager and 64-token greedy generation is token-identical; with an expert actor killed mid-generation the
output is unchanged (re-sent to a replica when one exists, else after Ray restarts the actor); a served MoE model
with experts in actors matches HF generate; SmolLM2 with its MLPs split over two actors is token-identical."""

import socket
import threading
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from specserve.actors.experts.hook import experts_modules, install_dispatch
from specserve.actors.experts.ray_transport import ActorTransport, ExpertsUnavailable, actor_spec, start_actors
from specserve.cluster.config import ExpertsConfig
from tiny_models import MOE_ARCHS, make_tiny_model

pytestmark = pytest.mark.integration
GEN = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.set_experts_implementation("eager")
    return model.eval()


EXPERTS = ExpertsConfig()  # the configured defaults, where a test does not choose


def _with_actors(path, *, replicated: bool, link: str = "channel", **transport_args):
    """The model with its experts in two actors: expert e of each layer on actor e % 2, or on both."""
    model = _load(path)
    layers = experts_modules(model)
    n = next(iter(layers.values())).num_experts
    owners = {(layer, e): ([e % 2, 1 - e % 2] if replicated else [e % 2]) for layer in layers for e in range(n)}
    spec = actor_spec(str(path), model.config.hidden_act, num_cpus=0.1)
    actors, pg = start_actors(spec, owners, 2)
    transport = ActorTransport(actors, owners, link=link, channel_key=spec.channel_key,
                               **{"timeout_s": 10, "restart_wait_s": EXPERTS.restart_wait_s, **transport_args})
    transport.placement_group = pg
    install_dispatch(model, transport)
    return model, transport, actors


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_actors_match_eager(ray_cluster, tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch=arch, seed=21, num_layers=3)
    ref = _load(path)
    model, transport, actors = _with_actors(path, replicated=False)
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
        transport.shutdown()


def _kill_after(transport, actor, calls: int):
    def run():
        while transport.calls < calls:
            time.sleep(0.001)
        ray.kill(actor, no_restart=False)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("replicated,link", [(False, "channel"), (True, "channel"), (False, "ray")],
                         ids=["restart", "replica", "restart-ray-link"])
def test_killed_expert_actor_changes_nothing(ray_cluster, tmp_path, replicated, link):
    path = make_tiny_model(tmp_path / "m", arch="qwen2_moe", seed=22, num_layers=3)
    ref = _load(path)
    model, transport, actors = _with_actors(path, replicated=replicated, link=link)
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
        transport.shutdown()


def _kill_for_good(actor, timeout_s: float = 30.0) -> None:
    """ray.kill(no_restart=True), returning once the actor's process is gone: Ray reports the actor dead before
    its process exits, and until then the process still answers on its channel."""
    address = tuple(ray.get(actor.channel_address.remote()))
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(address, timeout=1).close()
        except OSError:  # refused: nothing listens there any more
            return
        time.sleep(0.05)
    raise AssertionError(f"expert actor's channel {address} still open {timeout_s} s after ray.kill")


def test_expert_actor_that_cannot_restart_fails_the_forward_in_bounded_time(ray_cluster, tmp_path):
    """An actor that never comes back must not hold requests for minutes: each layer waits at most
    restart_wait_s (re-sends, a restart), then the forward (the engine step) fails with an error naming it."""
    path = make_tiny_model(tmp_path / "m", arch="qwen2_moe", seed=22, num_layers=3)
    model, transport, actors = _with_actors(path, replicated=False, timeout_s=2, restart_wait_s=4)
    try:
        ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            model(ids)  # served by both actors
            _kill_for_good(actors[1])
            for _ in range(2):  # and again: nothing piles up behind the first wait
                t0 = time.monotonic()
                with pytest.raises(ExpertsUnavailable, match=r"expert actor.*experts\.restart_wait_s"):
                    model(ids)
                # The bound is restart_wait_s per layer (4 s here); the margin is for a loaded machine.
                assert time.monotonic() - t0 < 60
    finally:
        transport.shutdown()


def _skewed_trace(layers, num_experts, hidden, steps=6, tokens=32):
    """(layer, rows, top-k) steps where experts 0 and 2 (both on actor 0 statically) get most rows."""
    g = torch.Generator().manual_seed(5)
    popularity = torch.tensor([8.0, 1.0, 8.0, 1.0] + [0.5] * (num_experts - 4))
    x = torch.randn(tokens, hidden, generator=g)
    return [(layer, x, torch.stack([torch.multinomial(popularity, 2, generator=g) for _ in range(tokens)]))
            for _ in range(steps) for layer in layers]


def test_live_rebalance_mid_generation_keeps_tokens_and_balances(ray_cluster, tmp_path):
    from specserve.actors.experts.balancer import ExpertBalancer
    from specserve.actors.experts.eplb import balance_ratio
    from specserve.tools.bench_experts import replay_trace

    path = make_tiny_model(tmp_path / "m", arch="olmoe", seed=24, num_layers=2)
    ref = _load(path)
    model, transport, actors = _with_actors(path, replicated=False)
    try:
        layers = experts_modules(ref)
        trace = _skewed_trace(sorted(layers), 8, ref.config.hidden_size)
        skewed = balance_ratio(replay_trace(transport, trace))
        balancer = ExpertBalancer(transport, transport.experts_per_layer, redundant_slots=1, min_tokens=0)
        report = {}
        worker = threading.Thread(target=lambda: report.update(balancer.rebalance_once(switch_timeout_s=120)))
        prompt = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            expected = ref.generate(prompt, **GEN)
            worker.start()
            generations = 0
            while worker.is_alive() or generations == 0:  # the switch lands between two steps of a generation
                assert torch.equal(model.generate(prompt, **GEN), expected)
                generations += 1
        worker.join()
        assert report["applied"] and transport.placements == 1 and report["loaded"] > 0 and report["dropped"] > 0
        balanced = balance_ratio(replay_trace(transport, trace))
        assert skewed > 1.3 and balanced < skewed, (skewed, balanced, report)
        for a, actor in enumerate(actors):  # each actor holds exactly the slots the new map gives it
            assert ray.get(actor.hold_slots.remote(transport.slots_of(a))) == {"loaded": 0, "dropped": 0}
    finally:
        transport.shutdown()


@ray.remote(num_cpus=0)
class _UnresponsiveExpertActor:
    """An expert actor stuck loading its slots (a hung disk read): it answers nothing until killed."""

    def load_slots(self, slots) -> int:
        threading.Event().wait()
        return 0


class _OneActorMap:
    """What ExpertBalancer.apply reads of a transport: its actors, and the map it switches."""

    def __init__(self, actors):
        self.actors = actors


def test_balancer_round_ends_when_an_actor_does_not_answer(ray_cluster):
    from ray.exceptions import GetTimeoutError

    from specserve.actors.experts.balancer import ExpertBalancer

    actor = _UnresponsiveExpertActor.remote()
    try:
        balancer = ExpertBalancer(_OneActorMap([actor]), {0: 2}, redundant_slots=1, call_timeout_s=1.0)
        with pytest.raises(GetTimeoutError):
            balancer.apply({(0, 0): [0], (0, 1): [0]}, switch_timeout_s=1.0)
    finally:
        ray.kill(actor)


def test_bench_experts_smoke(ray_cluster, tmp_path, capsys):
    from specserve.tools import bench_experts

    out = tmp_path / "experts.json"
    assert bench_experts.main(["--part", "dispatch,balance", "--hidden", "64", "--intermediate", "64",
                               "--layers", "2", "--experts", "8", "--iters", "3", "--json", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    assert [r["tokens"] for r in res["dispatch"]] == [1, 16, 64]
    assert res["balance"]["after"] < res["balance"]["before"]
    assert "before" in capsys.readouterr().out


def test_served_moe_with_expert_actors_matches_hf_generate(ray_cluster, tmp_path):
    import httpx

    from served_apps import start_app

    path = make_tiny_model(tmp_path / "served", arch="mixtral", seed=23, num_layers=2)
    server = start_app(ray_cluster, str(path), "moe-actors", **{"experts.num_actors": 2,
                                                                "experts.num_cpus": 0.1,
                                                                "speculative.method": "none"})
    try:
        ref = _load(path)
        prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 11)]
        for prompt in prompts:
            r = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
                "model": "moe-actors", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            assert r.status_code == 200, r.text
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
            assert r.json()["choices"][0]["token_ids"] == expected[0, len(prompt):].tolist()
        from ray import serve

        stats = serve.get_deployment_handle("Verifier", app_name="moe-actors").stats.remote().result()
        assert stats["experts"]["actors"] == 2 and stats["experts"]["calls"] >= 2 * 24  # every step went to them
    finally:
        server.stop()


def test_smollm2_with_ffn_shards_in_actors_is_token_identical(ray_cluster):
    from specserve.actors.experts.ray_transport import attach_expert_actors
    from specserve.actors.model_loader import resolve_model_path
    from specserve.cluster.config import ModelConfig

    path = resolve_model_path("smollm2-135m", ModelConfig().cache_dir)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    transport = attach_expert_actors(model, str(path), 2, num_cpus=0.1, shard_dense_ffn=True, link=EXPERTS.transport,
                                     timeout_s=EXPERTS.timeout_s, restart_wait_s=EXPERTS.restart_wait_s)
    try:
        assert len(set(ray.get([a.node_id.remote() for a in transport.actors]))) == 2
        prompt = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2]])
        kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
        with torch.no_grad():
            assert torch.equal(model.generate(prompt, **kw), ref.generate(prompt, **kw))
        assert transport.calls >= 2 * 30 * 24  # both actors, every layer, every token
    finally:
        transport.shutdown()
