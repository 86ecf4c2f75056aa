"""bench-hops' pure parts: which process is which hop, CPU time per token, the verifier's thread split."""

import threading

import pytest

from specserve.actors.engine.async_engine import _name_os_thread
from specserve.tools import bench_hops
from specserve.tools.bench_hops import ENGINE_THREAD, CpuSample, HopsRow, format_table, hop_of, per_token_ms


@pytest.mark.parametrize("cmdline, hop", [
    ("ray::ServeReplica:hops:Verifier", "verifier"),
    ("ray::ServeReplica:hops:Ingress ", "ingress"),
    ("ray::ServeReplica:hops:Drafter", "drafter"),
    ("ray::ProxyActor", "proxy"),
    ("ray::ServeReplica:other:Verifier", None),  # another application's replica
    ("ray::ServeReplica:hops:VerifierX", None),
    ("ray::ServeController", None),
    ("python -m ray::ServeReplica:hops:Verifier", None),
    ("", None),
])
def test_processes_are_told_apart_by_their_ray_title(cmdline, hop):
    assert hop_of(cmdline, "hops") == hop


def test_cpu_per_token_per_hop_and_the_verifier_thread_split():
    before = CpuSample({"verifier": 10.0, "ingress": 1.0, "client": 0.5},
                       {(1, 1): (ENGINE_THREAD, 8.0), (1, 2): ("ray::ServeRepli", 1.0), (1, 3): ("gone", 1.0)})
    after = CpuSample({"verifier": 12.0, "ingress": 1.2, "client": 0.6, "proxy": 0.1},
                      {(1, 1): (ENGINE_THREAD, 9.5), (1, 2): ("ray::ServeRepli", 1.25), (1, 4): (ENGINE_THREAD, 0.2)})
    cost = per_token_ms(before, after, tokens=100)
    assert cost["verifier"] == pytest.approx(20.0) and cost["ingress"] == pytest.approx(2.0)
    assert cost["client"] == pytest.approx(1.0)
    assert cost["proxy"] == pytest.approx(1.0)  # a hop first seen in `after` counts from zero
    assert cost["verifier.engine_thread"] == pytest.approx(17.0)  # a thread born in between counts from zero
    assert cost["verifier.other_threads"] == pytest.approx(2.5)
    assert per_token_ms(before, after, tokens=0) == {}


def test_the_engine_thread_name_is_what_bench_hops_looks_for():
    seen = []

    def named():
        _name_os_thread("specserve-engine")
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen.append(f.read().strip())

    t = threading.Thread(target=named)
    t.start()
    t.join()
    assert seen == [ENGINE_THREAD]


def test_the_table_has_a_row_per_measurement_and_a_column_per_hop_seen():
    rows = [HopsRow("http", 8, 0, 400, 2.0, 200.0, 30.0, {"verifier": 5.0, "proxy": 0.3}, {"verifier": 1.0},
                    engine_step_ms_per_token=4.0),
            HopsRow("grpc", 8, 0, 400, 2.0, 200.0, 30.0, {"verifier": 5.0}, {})]
    lines = format_table(rows).splitlines()
    assert "verifier" in lines[1] and "proxy" in lines[1] and "ingress" not in lines[1]
    assert lines[2].startswith("http") and "4.00" in lines[2] and lines[3].startswith("grpc")


@pytest.mark.parametrize("argv", [["--protocols", "ftp"], ["--protocols", ""], ["--concurrency", "0"],
                                  ["--set", "novalue"]])
def test_bad_arguments_are_refused_before_anything_starts(argv, monkeypatch):
    monkeypatch.setattr(bench_hops, "run", lambda args: pytest.fail("started a server"))
    with pytest.raises(SystemExit) as exc:
        bench_hops.main(argv)
    assert exc.value.code != 0
