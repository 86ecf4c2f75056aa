"""The typed messages of the request path (actors/engine/messages.py) and how each protocol renders usage."""

import json
import pickle

from specserve.actors.engine.messages import (GenerateRequest, LoadReport, RequestOutput, RoutingHints,
                                              RoutingUsage, TokenLogprobs, Usage)
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.routing.grpc_api import usage_pb
from specserve.routing.openai_api import openai_usage


def test_messages_cross_a_process_boundary_by_pickle():
    request = GenerateRequest(request_id="cmpl-1", prompt_token_ids=[1, 2, 3],
                              params=SamplingParams(max_tokens=4, temperature=0, stop_token_ids={7}, seed=3),
                              tenant="acme", routing=RoutingHints(block_hashes=[b"h1"], route_key=b"h1",
                                                                  session_key="s"))
    out = RequestOutput("cmpl-1", [5, 6], False, None, 3, 0, 2, 1, 3, 2, 0, 0.01)
    assert pickle.loads(pickle.dumps(request)) == request
    assert pickle.loads(pickle.dumps(out)) == out


def test_outputs_a_slow_consumer_missed_merge_into_one():
    outs = [RequestOutput("r", [5], False, None, 3, 0, 1), RequestOutput("r", [6, 7], False, None, 3, 0, 3),
            RequestOutput("r", [8], True, "length", 3, 0, 4)]
    [merged] = RequestOutput.merge(outs)
    assert (merged.new_token_ids, merged.num_output_tokens, merged.finished) == ([5, 6, 7, 8], 4, True)


def test_merge_joins_only_consecutive_outputs_of_one_choice_and_keeps_their_logprobs():
    def out(index, tokens, *, finished=False, prompt_logprobs=None):
        return RequestOutput("r", tokens, finished, "stop" if finished else None, 3, 0, index=index,
                             logprobs=[TokenLogprobs(t, -0.5, []) for t in tokens],
                             prompt_logprobs=prompt_logprobs)

    prompt_lps = [None, TokenLogprobs(4, -1.0, []), TokenLogprobs(5, -2.0, [])]
    outs = [out(0, [5], prompt_logprobs=prompt_lps), out(0, [6]), out(1, [7]), out(1, [8], finished=True),
            out(0, [9])]
    merged = RequestOutput.merge(outs)
    assert [(m.index, m.new_token_ids, m.finished) for m in merged] == [
        (0, [5, 6], False), (1, [7, 8], True), (0, [9], False)]
    assert [lp.token_id for lp in merged[0].logprobs] == [5, 6] and merged[0].prompt_logprobs == prompt_lps
    assert [lp.token_id for lp in merged[1].logprobs] == [7, 8] and merged[1].prompt_logprobs is None


def test_load_report_reads_back_what_serve_carried():
    report = LoadReport(num_running=2, num_waiting=1, queued_prefill_tokens=300, prefill_tokens_per_s=900.0,
                        import_tokens_per_s=5e4, step_s=0.02)
    assert LoadReport.from_dict(report.as_dict()) == report
    # A replica that has not reported yet reads as idle; keys of another verifier version are ignored.
    assert LoadReport.from_dict(None) == LoadReport.from_dict({}) == LoadReport()
    assert LoadReport.from_dict({"num_running": 3, "added_later": 1}) == LoadReport(num_running=3)


def usage(routing: RoutingUsage | None = None) -> Usage:
    return Usage(prompt_tokens=40, completion_tokens=12, cached_tokens=32, imported_tokens=16, spec_rounds=4,
                 draft_tokens=12, accepted_tokens=9, routing=routing)


def test_openai_usage_renders_every_counter_in_openai_shape():
    # The exact bytes HTTP responses carry (clients and tools/bench read these keys).
    assert json.dumps(openai_usage(usage()), separators=(",", ":")) == (
        '{"prompt_tokens":40,"completion_tokens":12,"total_tokens":52,'
        '"prompt_tokens_details":{"cached_tokens":32},'
        '"completion_tokens_details":{"accepted_prediction_tokens":9,"rejected_prediction_tokens":3},'
        '"speculation":{"rounds":4,"draft_tokens":12,"accepted_tokens":9},'
        '"kv_store":{"imported_tokens":16}}')
    routed = openai_usage(usage(RoutingUsage(reason="store", predicted_cached_tokens=32,
                                             predicted_imported_tokens=16)))
    assert list(routed)[-1] == "routing" and routed["routing"] == {
        "reason": "store", "predicted_cached_tokens": 32, "predicted_imported_tokens": 16}
    assert openai_usage(None) == {}  # a stream that ended before any output


def test_grpc_usage_is_filled_from_the_same_usage():
    u = usage_pb(usage(RoutingUsage(reason="prefix", predicted_cached_tokens=32, predicted_imported_tokens=0)))
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.imported_tokens, u.draft_tokens,
            u.accepted_tokens, u.spec_rounds) == (40, 12, 32, 16, 12, 9, 4)
