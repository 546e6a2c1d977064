"""The scheduler alone, no model: admission, slots, queue bound, deadlines, cancellation, finish reasons."""

from __future__ import annotations

from appliance.scheduler import Finish, Scheduler, Sequence, State

EOS = 2


def seq(key: str, prompt_len: int = 3, max_tokens: int = 5, deadline: float | None = None) -> Sequence:
    return Sequence(key=key, prompt_ids=[1] * prompt_len, max_tokens=max_tokens, deadline=deadline, arrival=0.0)


def test_waiting_requests_fill_free_slots_in_arrival_order():
    s = Scheduler(num_slots=2, max_queued=10, max_seq_len=64, eos_token_id=EOS)
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        assert s.add(x)
    plan = s.schedule(now=1.0)
    assert plan.prefill == [a, b] and plan.decode == []
    assert (a.slot, b.slot, c.state) == (0, 1, State.WAITING)


def test_request_joins_as_soon_as_another_leaves():
    s = Scheduler(num_slots=1, max_queued=10, max_seq_len=64, eos_token_id=EOS)
    a, b = seq("a", max_tokens=1), seq("b")
    s.add(a)
    s.add(b)
    s.schedule(now=1.0)
    assert s.on_token(a, 7, now=1.1) and a.finish is Finish.LENGTH
    assert s.take_finished() == [a]
    plan = s.schedule(now=1.2)
    assert plan.prefill == [b] and b.slot == 0


def test_running_sequences_with_tokens_decode():
    s = Scheduler(num_slots=2, max_queued=10, max_seq_len=64, eos_token_id=EOS)
    a = seq("a")
    s.add(a)
    s.schedule(now=0.0)
    s.on_token(a, 9, now=0.1)
    assert s.schedule(now=0.2).decode == [a]


def test_full_queue_refuses():
    s = Scheduler(num_slots=1, max_queued=2, max_seq_len=64, eos_token_id=EOS)
    assert s.add(seq("a")) and s.add(seq("b"))
    assert not s.add(seq("c"))


def test_eos_finishes_without_adding_the_token():
    s = Scheduler(num_slots=1, max_queued=2, max_seq_len=64, eos_token_id=EOS)
    a = seq("a")
    s.add(a)
    s.schedule(now=0.0)
    assert s.on_token(a, EOS, now=0.1)
    assert a.finish is Finish.EOS and a.output_ids == [] and s.free_slots == [0]


def test_ignore_eos_keeps_generating():
    s = Scheduler(num_slots=1, max_queued=2, max_seq_len=64, eos_token_id=EOS)
    a = Sequence(key="a", prompt_ids=[1], max_tokens=2, ignore_eos=True)
    s.add(a)
    s.schedule(now=0.0)
    assert not s.on_token(a, EOS, now=0.1)
    assert s.on_token(a, EOS, now=0.2) and a.finish is Finish.LENGTH and a.output_ids == [EOS, EOS]


def test_context_limit_finishes_the_sequence():
    s = Scheduler(num_slots=1, max_queued=2, max_seq_len=5, eos_token_id=EOS)
    a = seq("a", prompt_len=3, max_tokens=100)
    s.add(a)
    s.schedule(now=0.0)
    assert not s.on_token(a, 5, now=0.1)
    assert s.on_token(a, 6, now=0.2) and a.finish is Finish.CONTEXT


def test_deadline_expires_waiting_and_running_requests():
    s = Scheduler(num_slots=1, max_queued=5, max_seq_len=64, eos_token_id=EOS)
    running, waiting = seq("r", deadline=5.0), seq("w", deadline=3.0)
    s.add(running)
    s.schedule(now=0.0)
    s.add(waiting)
    plan = s.schedule(now=6.0)
    assert {x.key for x in plan.finished} == {"r", "w"}
    assert running.finish is waiting.finish is Finish.DEADLINE
    assert s.free_slots == [0]


def test_cancel_frees_the_slot_for_the_next_request():
    s = Scheduler(num_slots=1, max_queued=5, max_seq_len=64, eos_token_id=EOS)
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.schedule(now=0.0)
    assert s.cancel("a") is a and a.finish is Finish.CANCELLED
    plan = s.schedule(now=0.1)
    assert plan.finished == [a] and plan.prefill == [b]
    assert s.cancel("unknown") is None
