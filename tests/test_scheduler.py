"""The scheduler alone, no model: admission, slots, queue bound, deadlines, cancellation, finish reasons."""

from __future__ import annotations

from appliance.serving.scheduler import Finish, Scheduler, Sequence, State

EOS = 2


def seq(key: str, prompt_len: int = 3, max_tokens: int = 5, deadline: float | None = None) -> Sequence:
    return Sequence(key=key, prompt_ids=[1] * prompt_len, max_tokens=max_tokens, deadline=deadline, arrival=0.0)


def test_waiting_requests_fill_free_slots_in_arrival_order():
    s = Scheduler(num_slots=2, max_queued=10, max_seq_len=64, eos_token_ids=(EOS,))
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        assert s.add(x)
    plan = s.schedule(now=1.0)
    assert [r.key for r in plan.prefill] == ["a", "b"] and plan.decode == []
    assert (a.slot, b.slot, c.state) == (0, 1, State.WAITING)


def test_request_joins_as_soon_as_another_leaves():
    s = Scheduler(num_slots=1, max_queued=10, max_seq_len=64, eos_token_ids=(EOS,))
    a, b = seq("a", max_tokens=1), seq("b")
    s.add(a)
    s.add(b)
    s.schedule(now=1.0)
    assert s.on_token(a, 7, now=1.1) and a.finish is Finish.LENGTH
    assert s.take_finished() == [a]
    plan = s.schedule(now=1.2)
    assert [r.key for r in plan.prefill] == ["b"] and b.slot == 0


def test_running_sequences_with_tokens_decode():
    s = Scheduler(num_slots=2, max_queued=10, max_seq_len=64, eos_token_ids=(EOS,))
    a = seq("a")
    s.add(a)
    s.schedule(now=0.0)
    s.on_token(a, 9, now=0.1)
    # the decode row carries the last token at the end of the context (prompt 3 + 1 output token)
    assert [(r.key, r.slot, r.tokens, r.start, r.end) for r in s.schedule(now=0.2).decode] == [("a", 0, (9,), 3, 4)]


def test_full_queue_refuses():
    s = Scheduler(num_slots=1, max_queued=2, max_seq_len=64, eos_token_ids=(EOS,))
    assert s.add(seq("a")) and s.add(seq("b")) and s.add(seq("c"))  # one of them takes the free slot
    assert not s.add(seq("d"))


def test_a_burst_fills_free_slots_before_it_counts_as_waiting():
    """Six requests in one loop turn to an idle daemon with 4 slots and a queue of 4: none is busy (one was)."""
    s = Scheduler(num_slots=4, max_queued=4, max_seq_len=64, eos_token_ids=(EOS,))
    assert all(s.add(seq(f"r{i}")) for i in range(8))
    assert not s.add(seq("r8"))
    s.schedule(now=0.0)
    assert len(s.running) == 4 and len(s.waiting) == 4 and not s.add(seq("r9"))


def test_eos_finishes_without_adding_the_token():
    s = Scheduler(num_slots=1, max_queued=2, max_seq_len=64, eos_token_ids=(EOS,))
    a = seq("a")
    s.add(a)
    s.schedule(now=0.0)
    assert s.on_token(a, EOS, now=0.1)
    assert a.finish is Finish.EOS and a.output_ids == [] and s.free_slots == [0]


def test_ignore_eos_keeps_generating():
    s = Scheduler(num_slots=1, max_queued=2, max_seq_len=64, eos_token_ids=(EOS,))
    a = Sequence(key="a", prompt_ids=[1], max_tokens=2, ignore_eos=True)
    s.add(a)
    s.schedule(now=0.0)
    assert not s.on_token(a, EOS, now=0.1)
    assert s.on_token(a, EOS, now=0.2) and a.finish is Finish.LENGTH and a.output_ids == [EOS, EOS]


def test_context_limit_finishes_the_sequence():
    s = Scheduler(num_slots=1, max_queued=2, max_seq_len=5, eos_token_ids=(EOS,))
    a = seq("a", prompt_len=3, max_tokens=100)
    s.add(a)
    s.schedule(now=0.0)
    assert not s.on_token(a, 5, now=0.1)
    assert s.on_token(a, 6, now=0.2) and a.finish is Finish.CONTEXT


def test_deadline_expires_waiting_and_running_requests():
    s = Scheduler(num_slots=1, max_queued=5, max_seq_len=64, eos_token_ids=(EOS,))
    running, waiting = seq("r", deadline=5.0), seq("w", deadline=3.0)
    s.add(running)
    s.schedule(now=0.0)
    s.add(waiting)
    plan = s.schedule(now=6.0)
    assert {x.key for x in plan.finished} == {"r", "w"}
    assert running.finish is waiting.finish is Finish.DEADLINE
    assert s.free_slots == [0]


def test_cancel_frees_the_slot_for_the_next_request():
    s = Scheduler(num_slots=1, max_queued=5, max_seq_len=64, eos_token_ids=(EOS,))
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.schedule(now=0.0)
    assert s.cancel("a") is a and a.finish is Finish.CANCELLED
    plan = s.schedule(now=0.1)
    assert plan.finished == [a] and [r.key for r in plan.prefill] == ["b"]
    assert s.cancel("unknown") is None


def test_long_prompt_is_prefilled_in_chunks_while_running_requests_keep_decoding():
    s = Scheduler(num_slots=2, max_queued=10, max_seq_len=1024, eos_token_ids=(EOS,), prefill_chunk=64)
    short = seq("short", prompt_len=4, max_tokens=50)
    s.add(short)
    s.schedule(now=0.0)
    s.on_token(short, 7, now=0.1)
    long = seq("long", prompt_len=150, max_tokens=5)
    s.add(long)
    chunks = []
    for step in range(4):
        plan = s.schedule(now=1.0 + step)
        assert [r.key for r in plan.decode] == ["short"]  # the running request advances at every step
        if plan.prefill:
            (row,) = plan.prefill
            assert row.key == "long" and row.tokens == tuple(long.feed_ids[row.start : row.end])
            chunks.append((row.start, row.end))
        s.on_token(short, 7, now=1.0 + step)
    assert chunks == [(0, 64), (64, 128), (128, 150)]
    assert long.prefill_done and not long.output_ids


def test_prefill_budget_is_shared_oldest_first_and_admission_waits_for_budget():
    s = Scheduler(num_slots=3, max_queued=10, max_seq_len=1024, eos_token_ids=(EOS,), prefill_chunk=100)
    a, b, c = seq("a", prompt_len=130), seq("b", prompt_len=50), seq("c", prompt_len=10)
    for x in (a, b, c):
        s.add(x)
    plan = s.schedule(now=0.0)
    assert [(r.key, r.start, r.end) for r in plan.prefill] == [("a", 0, 100)]  # the budget is spent: b and c wait
    assert (b.state, c.state) == (State.WAITING, State.WAITING)
    plan = s.schedule(now=1.0)
    # a finishes its prompt first (oldest), then b and c are admitted in arrival order with what is left
    assert [(r.key, r.start, r.end, r.first, r.last) for r in plan.prefill] == [
        ("a", 100, 130, False, True), ("b", 0, 50, True, True), ("c", 0, 10, True, True)]  # fmt: skip


def test_context_limit_counts_restored_session_tokens():
    s = Scheduler(num_slots=1, max_queued=10, max_seq_len=20, eos_token_ids=(EOS,))
    turn = Sequence(key="t2", prompt_ids=[1, 5, 6], max_tokens=50, feed_ids=[9, 5, 6], base_len=15, arrival=0.0)
    s.add(turn)
    s.schedule(now=0.0)
    assert turn.context_len == 18
    assert not s.on_token(turn, 7)
    assert s.on_token(turn, 7) and turn.finish is Finish.CONTEXT


def test_a_cache_hit_finishes_without_a_slot():
    s = Scheduler(num_slots=1, max_queued=10, max_seq_len=64, eos_token_ids=(EOS,))
    hit = seq("hit")
    s.finish_now(hit, Finish.LENGTH)
    plan = s.schedule(now=0.0)
    assert plan.finished == [hit] and hit.slot is None and s.free_slots == [0]


def test_any_of_several_eos_ids_finishes_the_sequence():
    """Qwen-family checkpoints list two end ids (<|im_end|>, <|endoftext|>) in generation_config.json."""
    s = Scheduler(num_slots=2, max_queued=10, max_seq_len=64, eos_token_ids=(EOS, 9))
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.schedule(now=0.0)
    assert not s.on_token(a, 7, now=0.1)
    assert s.on_token(a, 9, now=0.2) and a.finish is Finish.EOS and a.output_ids == [7]
    assert s.on_token(b, EOS, now=0.2) and b.finish is Finish.EOS and b.output_ids == []
