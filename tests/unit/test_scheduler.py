from specserve.actors.engine.block_manager import BlockManager
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.scheduler import Scheduler
from specserve.actors.engine.sequence import Sequence


def make(n_tokens, rid):
    return Sequence(rid, list(range(100 + len(rid), 100 + len(rid) + n_tokens)), SamplingParams(max_tokens=50))


def run_step(sched, out, new_token=7):
    """Apply a step's result as the engine would (without a model)."""
    for item in out.scheduled:
        done = item.completes_prompt
        item.seq.num_computed_tokens += item.num_new_tokens
        sched.bm.register_computed_blocks(item.seq)
        if done:
            item.seq.token_ids.append(new_token)


def test_decodes_are_never_stalled_by_long_prefills():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a = make(5, "a")
    sched.add(a)
    run_step(sched, sched.schedule())  # a's prefill
    b = make(60, "b")
    sched.add(b)
    for _ in range(4):
        out = sched.schedule()
        kinds = {s.seq.request_id: s.num_new_tokens for s in out.scheduled}
        assert kinds["a"] == 1  # a decodes every step
        assert out.num_tokens <= 16
        run_step(sched, out)
    assert b.num_computed_tokens == 60 and b.num_output_tokens == 1  # 15 + 15 + 15 + 15: chunked, then sampled


def test_admission_respects_max_num_seqs_and_fifo():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make(3, f"s{i}") for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["s0", "s1"]
    assert len(sched.waiting) == 2


def test_preemption_frees_newest_and_requeues_it_first():
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make(8, "a"), make(12, "b")  # 2 + 3 blocks
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())  # both prefilled, each got a token: a=9 tokens needs a 3rd block
    out = sched.schedule()
    assert out.preempted == [b]
    assert sched.waiting[0] is b and b.block_table == [] and b.num_computed_tokens == 0
    assert [s.seq for s in out.scheduled] == [a]
    bm.check_invariants()


def test_nothing_scheduled_when_idle():
    sched = Scheduler(BlockManager(10, 4), max_num_seqs=2, max_num_batched_tokens=16)
    out = sched.schedule()
    assert out.scheduled == [] and not sched.has_work()


def test_drafts_are_cut_to_the_token_budget_not_dropped():
    from specserve.actors.engine.speculation import Draft

    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=12)
    a, b = make(5, "a"), make(5, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())  # both prefilled: each decodes next
    a.draft = Draft([1, 2, 3, 4, 5, 6, 7, 8], parents=[-1, 0, 0, 1, 1, 2, 3, 4])
    b.draft = Draft([9, 10, 11])
    out = sched.schedule()
    # a keeps 12 - 1 (b's token) - 1 (its own) = 10 >= 8 tokens; b then has 12 - 9 - 1 = 2 for its 3.
    assert [(s.num_new_tokens, s.num_draft) for s in out.scheduled] == [(9, 8), (3, 2)]
    assert b.draft.tokens == [9, 10] and out.num_tokens == 12
    # A tree longer than the room keeps its first nodes (still a tree); no room at all drops the draft.
    a.draft = Draft(list(range(1, 13)), parents=[-1, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8])
    b.draft = Draft([9])
    out = sched.schedule()
    assert [(s.num_new_tokens, s.num_draft) for s in out.scheduled] == [(11, 10), (1, 0)]
    assert a.draft.parents == [-1, 0, 0, 1, 1, 2, 3, 4, 5, 6] and b.draft is None
    sched.bm.check_invariants()
