"""Tenants key their own prefixes (the block manager's hash roots), error codes map one to one across HTTP and
gRPC, tiny temperatures are greedy, and gRPC sampling fields are checked by name."""

import math

import grpc
import pytest
import torch

from specserve.actors.engine.block_manager import BlockManager
from specserve.actors.engine.sampler import sample
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.sequence import Sequence
from specserve.cluster.kv.namespace import tenant_namespace
from specserve.actors.engine.block_hash import block_hashes, root_hash
from specserve.routing.errors import APIError, api_error_of


def admit(bm, tokens, root):
    seq = Sequence(f"r{id(tokens)}-{root!r}", tokens, SamplingParams(max_tokens=1), hash_root=root)
    bm.allocate(seq)
    seq.num_computed_tokens = len(tokens)
    bm.register_computed_blocks(seq)
    return seq


def test_tenants_do_not_share_prefix_blocks():
    bm = BlockManager(num_blocks=32, block_size=4, namespace="ns")
    tokens = list(range(17))
    root_a = root_hash(tenant_namespace("ns", "team-a", "default"))
    root_b = root_hash(tenant_namespace("ns", "team-b", "default"))
    admit(bm, tokens, root_a)
    assert len(bm.match_prefix(tokens, root_a)) == 4
    assert bm.match_prefix(tokens, root_b) == [] and bm.match_prefix(tokens) == []
    assert bm.missing_prefix(tokens, root_b) == (0, block_hashes(tokens[:16], 4, namespace="ns/tenant/team-b"))
    seq_b = admit(bm, tokens, root_b)
    assert seq_b.num_cached_tokens == 0
    assert admit(bm, tokens, root_a).num_cached_tokens == 16


def test_default_tenant_keeps_the_deployment_namespace():
    assert tenant_namespace("ns", None, "default") == "ns" == tenant_namespace("ns", "default", "default")
    assert tenant_namespace("ns", "x", "default") != tenant_namespace("ns", "y", "default")


@pytest.mark.parametrize("status, code", [(400, grpc.StatusCode.INVALID_ARGUMENT),
                                          (401, grpc.StatusCode.UNAUTHENTICATED),
                                          (403, grpc.StatusCode.PERMISSION_DENIED),
                                          (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
                                          (503, grpc.StatusCode.UNAVAILABLE),
                                          (504, grpc.StatusCode.DEADLINE_EXCEEDED),
                                          (500, grpc.StatusCode.INTERNAL)])
def test_http_status_and_grpc_code_agree(status, code):
    assert APIError(status, "x").grpc_code == code


def test_serve_errors_map_to_retriable_codes():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    busy = api_error_of(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert busy.status == 429 and busy.retry_after_s and busy.headers()["Retry-After"] == "1"
    assert api_error_of(ActorDiedError()).status == 503
    from specserve.actors.engine.engine import RequestRejected

    assert api_error_of(RequestRejected("prompt too long for the KV pool")).status == 400
    assert api_error_of(ValueError("a bug of ours")).status == 500  # only the engine's rejections are 400
    assert api_error_of(KeyError("bug")).status == 500


def test_tiny_temperature_samples_greedily_instead_of_nan():
    logits = torch.randn(2, 50) * 30
    params = [SamplingParams(temperature=1e-170), SamplingParams(temperature=1e-30)]
    gens = [torch.Generator().manual_seed(0) for _ in params]
    assert sample(logits, params, gens) == logits.argmax(-1).tolist()


def test_grpc_sampling_fields_are_checked_by_name():
    from specserve.routing.grpc_api import sampling_params
    from specserve.v1 import generation_pb2 as pb

    def field_of(**kw):
        with pytest.raises(APIError) as err:
            sampling_params(pb.SamplingParams(**kw))
        assert err.value.status == 400
        return err.value.param

    assert field_of(temperature=math.nan) == "sampling.temperature"
    assert field_of(temperature=2.5) == "sampling.temperature"
    assert field_of(top_p=0.0) == "sampling.top_p"
    assert field_of(top_p=math.inf) == "sampling.top_p"
    assert field_of(stop=["a"] * 5) == "sampling.stop"
    assert field_of(stop=[""]) == "sampling.stop"
    assert field_of(max_tokens=0) == "sampling.max_tokens"
    ok = sampling_params(pb.SamplingParams(temperature=0.0, seed=2 ** 64 - 1, stop=["x"], max_tokens=7))
    assert ok.greedy and ok.seed == 2 ** 64 - 1 and ok.max_tokens == 7
    unset = sampling_params(pb.SamplingParams())
    assert unset.temperature == 1.0 and unset.max_tokens is None  # unset = the default
