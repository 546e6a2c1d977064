"""Serving-core units on real objects: the detokenizer, fair admission, connection tracking, the
audit aggregator, and per-request isolation on the real engine thread with a real model."""

from __future__ import annotations

from appliance.audit import Entry
from appliance.audit.aggregate import OVERFLOW_PEER, Aggregator
from appliance.audit.writer import AuditWriter
from appliance.config import load_config
from appliance.loader import load_model
from appliance.serving.admission import Admission, Peer
from appliance.serving.detokenize import Detokenizer, cut_at_stop, stop_prefix_len
from appliance.serving.runner import EngineRunner
from appliance.serving.scheduler import Scheduler, Sequence
from appliance.serving.sessions import SessionStore
from appliance.transport import protocol as P
from appliance.transport.connections import Connections
from tests.conftest import serve_in_process

CHARS = {1: "he", 2: "llo", 3: " wor", 4: "ld", 5: "\xe2", 6: "\x82\xac"}


def toy_decode(ids: list[int]) -> str:
    """A byte-level decoder: tokens 5 and 6 are the two halves of one UTF-8 character (€)."""
    raw = "".join(CHARS[i] for i in ids).encode("latin-1")
    return raw.decode("utf-8", errors="replace")


def test_detokenizer_streams_whole_characters_only():
    detok = Detokenizer(toy_decode)
    assert detok.step([1], False) == "he"
    assert detok.step([1, 5], False) == ""  # half a character is held back
    assert detok.step([1, 5, 6], False) == "€"
    assert detok.text == "he€"


def test_detokenizer_holds_back_a_possible_stop_and_cuts_at_it():
    detok = Detokenizer(toy_decode, stops=("o wo",))
    assert detok.step([1], False) == "he"
    assert detok.step([1, 2], False) == "ll"  # "o" may start the stop string
    assert detok.step([1, 2, 3], False) == ""
    assert detok.stopped and detok.text == "hell"


def test_stop_matching_picks_the_earliest_stop():
    assert cut_at_stop("ab", "cdef", ("ef", "cd")) == ("ab", True)
    assert cut_at_stop("ab", "c", ("zz",)) == ("abc", False)
    assert stop_prefix_len("hello wo", ("world",)) == 2


def test_admission_picks_the_client_with_fewest_running():
    sched = Scheduler(num_slots=2, max_queued=8, max_seq_len=64, eos_token_ids=(0,))
    for i in range(3):
        sched.add(Sequence(key=f"a{i}", prompt_ids=[1, 2], max_tokens=4, owner="a"))
    sched.add(Sequence(key="b0", prompt_ids=[1, 2], max_tokens=4, owner="b"))
    plan = sched.schedule()
    assert sorted(r.key for r in plan.prefill) == ["a0", "b0"]  # b jumps a's backlog


def test_a_cancel_racing_the_last_token_finishes_the_request_once():
    sched = Scheduler(num_slots=1, max_queued=2, max_seq_len=64, eos_token_ids=(0,))
    seq = Sequence(key="k", prompt_ids=[1, 2], max_tokens=1)
    sched.add(seq)
    sched.schedule()
    sched.cancel("k")  # the serving loop cancels while the engine thread holds the step's token
    sched.on_token(seq, 0)  # end-of-sequence arrives for the already finished request
    assert sched.take_finished() == [seq] and seq.finish.value == "cancelled"
    assert sched.free_slots == [0]


def test_a_late_disconnect_only_cancels_its_own_generation():
    conns = Connections()
    conns.accepted(12)
    conns.seen(b"old", 12)
    # the old peer closes and a new one gets descriptor 12: events arrive in this order
    assert conns.disconnected(12) == {b"old"}
    conns.accepted(12)
    conns.seen(b"new", 12)
    assert conns.disconnected(11) == set()
    assert conns.disconnected(12) == {b"new"}


def test_a_frame_read_after_its_connection_closed_is_not_bound_or_counted():
    """libzmq may still hold frames of a connection whose DISCONNECTED was already handled: such a frame must not
    bind its route again (no disconnect would ever clear it) nor count against its key's connection cap."""
    conns = Connections()
    conns.accepted(7)
    assert conns.seen(b"bob-1", 7) and conns.admit(b"bob-1", "bob", 1)
    assert conns.disconnected(7) == {b"bob-1"}
    assert not conns.seen(b"bob-1", 7)  # a late frame of the closed connection
    assert conns.connections_of("bob") == 0
    conns.accepted(7)  # a new connection gets the descriptor
    assert conns.seen(b"bob-2", 7) and conns.admit(b"bob-2", "bob", 1)
    assert not conns.admit(b"bob-3", "bob", 1)  # the key's cap holds


def test_aggregator_writes_a_burst_then_one_row_per_interval_and_loses_no_event():
    written: list[Entry] = []
    agg = Aggregator(written.extend, interval_s=10.0, burst=3, max_keys=2)
    for t in range(100):
        agg.add(
            Entry(request_id=f"r{t}", op="?", status="rejected", client="p1", error_code=P.E_MALFORMED), now=t / 100
        )
    agg.add(Entry(request_id="y", op="?", status="rejected", client="p2", error_code=P.E_MALFORMED), now=0.5)
    agg.add(Entry(request_id="z", op="?", status="rejected", client="p3", error_code=P.E_MALFORMED), now=0.5)
    assert [e.request_id for e in written] == ["r0", "r1", "r2", "y", "-"]  # p3 overflowed into "*"
    assert written[-1].client == OVERFLOW_PEER
    agg.flush(now=20.0)
    assert sum(e.occurrences for e in written) == 102
    assert written[-1].occurrences == 97 and written[-1].request_id == "-"


def test_a_request_whose_sampling_fails_ends_alone(device):
    """A NaN-producing temperature (bypassing protocol validation) fails its own request; the
    request decoding beside it in the same batch finishes normally."""
    model = load_model(load_config(device.config))
    good = P.Request(op=P.OP_GENERATE, id="good", prompt="Return the", max_tokens=12)
    bad = P.Request(
        op=P.OP_GENERATE, id="bad", prompt="Return the", max_tokens=12, sampling=P.Sampling(temperature=1e-320)
    )
    finals, runner = serve_in_process(model, [good, bad], slots=2, eos=(-1,))
    assert finals["bad"]["code"] == P.E_INTERNAL
    assert finals["good"]["type"] == "done" and finals["good"]["usage"]["completion_tokens"] == 12
    assert runner.request_failures == 1


def test_a_sequence_ended_twice_in_one_batch_is_answered_once(device):
    """A request cancelled in the step it finishes can appear twice in one batch that ends (seen once in 620 tests
    under the 100k-frame fuzz): the engine thread must answer it once and live on, not die on the second."""
    model = load_model(load_config(device.config))
    sessions = SessionStore(1 << 20, 60, 8)
    admission = Admission(sessions, None, max_per_client=8)
    sched = Scheduler(num_slots=2, max_queued=4, max_seq_len=model.engine.max_seq_len, eos_token_ids=(-1,))
    runner = EngineRunner(model, sched, AuditWriter(None), wake=lambda: None, sessions=sessions)
    job = admission.admit(
        model, P.Request(op=P.OP_GENERATE, id="twice", prompt="Return the"), Peer("t", "infer", b"r"), 0
    )
    assert runner.submit(job)
    runner.output.end([job.seq, job.seq], (P.E_CANCELLED, "cancelled"))  # the engine thread's own call, not started
    finals = []
    while not runner.outbox.empty():
        out = runner.outbox.get()
        finals += [P.decode_reply(out.frame)] if out.final else []
    assert [r["id"] for r in finals] == ["twice"]  # before: a KeyError on the second, and the thread was gone
