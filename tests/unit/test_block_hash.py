import subprocess
import sys

from specserve.actors.engine.block_hash import block_hashes, chain_hash, root_hash


def test_chained_hashes_depend_on_every_previous_block():
    a = block_hashes(list(range(32)), 8)
    b = block_hashes([99] + list(range(1, 32)), 8)
    assert len(a) == 4 and len(set(a)) == 4
    assert all(x != y for x, y in zip(a, b))  # a change in block 0 changes every later hash


def test_partial_block_is_not_hashed_and_prefixes_agree():
    full = block_hashes(list(range(35)), 8)
    assert len(full) == 4
    assert block_hashes(list(range(20)), 8) == full[:2]


def test_namespace_separates_models():
    assert block_hashes(list(range(16)), 8, namespace="m1") != block_hashes(list(range(16)), 8, namespace="m2")


def test_resume_from_parent_matches_full_computation():
    toks = list(range(40))
    full = block_hashes(toks, 8)
    assert block_hashes(toks, 8, parent=full[1], start_block=2) == full[2:]
    assert chain_hash(root_hash(), toks[:8]) == full[0]


def test_stable_across_processes():
    code = ("from specserve.actors.engine.block_hash import block_hashes;"
            "print(block_hashes(list(range(64)), 16, namespace='x')[-1].hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert outs == {block_hashes(list(range(64)), 16, namespace="x")[-1].hex()}
