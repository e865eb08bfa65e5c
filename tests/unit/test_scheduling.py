"""The scheduler's decisions: priority order, aging, FIFO, placement (pure logic)."""

from __future__ import annotations

import time

import pytest

from cicada_scheduler.state import JobRecord, State
from cicada_shared.contracts import InferJob, JobResult, LoaderStatus


def job(job_id: str, priority: int = 0, model: str = "m", waited_s: float = 0.0) -> JobRecord:
    record = JobRecord(
        InferJob(
            job_id=job_id, model=model, inputs=[], priority=priority, submitted_at=time.time()
        ),
        None,
    )
    record.accepted_at = time.time() - waited_s
    return record


def loader(
    state: State, loader_id: str, *, node: str = "n", resident: tuple[str, ...] = (), slots: int = 1
) -> None:
    state.heartbeat(
        LoaderStatus(
            loader_id=loader_id,
            node=node,
            resident=list(resident),
            slots=slots,
            busy=0,
            at=time.time(),
        )
    )


def accept_all(state: State, *records: JobRecord) -> None:
    for r in records:
        r_accepted = r.accepted_at
        state.accept(r)
        r.accepted_at = r_accepted


def test_most_urgent_first_then_oldest() -> None:
    state = State()
    accept_all(state, job("low1", 0), job("mid", 5), job("low2", 0), job("high", 9))
    assert [r.job.job_id for r in state.pending()] == ["high", "mid", "low1", "low2"]


def test_no_loader_no_placement_and_jobs_wait() -> None:
    state = State()
    accept_all(state, job("a"))
    assert state.place() == []
    loader(state, "L")
    (placement,) = state.place()
    assert placement.job.job.job_id == "a" and placement.cold
    assert state.place() == []  # the slot is taken


def test_release_just_in_time_one_per_free_slot() -> None:
    state = State()
    loader(state, "L", slots=2)
    accept_all(state, *(job(f"j{i}") for i in range(5)))
    assert len(state.place()) == 2
    assert len(state.pending()) == 3


def test_aging_lifts_old_jobs_but_never_past_urgent() -> None:
    state = State(aging_s=5.0)
    old_low = job("old-low", 0, waited_s=30.0)  # 6 levels of aging
    accept_all(state, job("fresh-mid", 5), old_low, job("urgent", 9))
    assert [r.job.job_id for r in state.pending()] == ["urgent", "old-low", "fresh-mid"]
    ancient = job("ancient", 0, waited_s=10_000.0)
    accept_all(state, ancient)
    assert state.effective_priority(ancient, time.time()) == 8


def test_fifo_mode_ignores_priority() -> None:
    state = State(priorities=False)
    accept_all(state, job("first", 0), job("second", 9), job("third", 5))
    assert [r.job.job_id for r in state.pending()] == ["first", "second", "third"]


def test_placement_prefers_resident_then_cached_node_then_least_loaded() -> None:
    state = State()
    loader(state, "busy-holder", resident=("m",))
    loader(state, "holder", resident=("m",))
    loader(state, "other", node="n2")
    accept_all(state, job("warm", model="m"))
    (p,) = state.place()
    assert not p.cold and p.loader.status.loader_id in {"busy-holder", "holder"}

    state = State()
    loader(state, "a", node="n1")
    loader(state, "b", node="n2")
    state.node_cache["n2"] = {"m"}
    accept_all(state, job("cached", model="m"))
    (p,) = state.place()
    assert p.cold and p.loader.status.loader_id == "b"

    state = State()
    loader(state, "a", slots=2)
    loader(state, "b", slots=2)
    state.loaders["a"].running.add("x")
    accept_all(state, job("least", model="q"))
    (p,) = state.place()
    assert p.loader.status.loader_id == "b"


def test_finish_frees_the_slot_and_records_residency() -> None:
    from cicada_shared.contracts import JobResult

    state = State()
    loader(state, "L")
    accept_all(state, job("a", model="m"), job("b", model="m"))
    (first,) = state.place()
    assert first.cold
    state.finish(JobResult(job_id="a", model="m", state="succeeded"))
    (second,) = state.place()
    assert second.job.job.job_id == "b" and not second.cold  # now resident there


@pytest.mark.parametrize("gone", ["silent", "stopping"])
def test_lost_loaders_are_expired(gone: str) -> None:
    state = State(loader_timeout_s=0.05)
    loader(state, "L")
    if gone == "stopping":
        state.heartbeat(
            LoaderStatus(
                loader_id="L", node="n", resident=[], slots=1, busy=0, at=time.time(), stopping=True
            )
        )
    else:
        time.sleep(0.06)
    assert [r.status.loader_id for r in state.expire()] == ["L"]
    assert state.alive() == []


def test_only_the_most_recently_finished_jobs_are_kept() -> None:
    state = State(keep_finished=2)
    records = [job(f"j{i}") for i in range(4)]
    for r in records:
        state.accept(r)
    for i in (2, 0, 3, 1):  # finishing order, not arrival order
        state.finish(JobResult(job_id=f"j{i}", model="m", state="succeeded"))
        state.finish(JobResult(job_id=f"j{i}", model="m", state="succeeded"))  # redelivered
    assert set(state.jobs) == {"j3", "j1"}
    assert state.forgotten == ["j2", "j0"]


def test_an_unregistered_model_is_forgotten_in_every_cache_that_may_hold_it() -> None:
    state = State()
    loader(state, "A", node="n1")
    accept_all(state, job("a", model="m"))
    state.place()  # a cold start on n1: n1's cache holds m from now on
    state.loaders["A"].status = state.loaders["A"].status.model_copy(update={"node": "n2"})
    state.node_cache["n3"] = {"other"}
    assert state.forget_cached("m") == ["n1", "n2"]  # where it was fetched; every live node
    assert "m" not in state.node_cache["n1"] and state.node_cache["n3"] == {"other"}


def test_jobs_wait_while_their_model_is_prepared() -> None:
    from cicada_scheduler.state import ModelRecord

    state = State()
    loader(state, "L", slots=2)
    state.models["new"] = ModelRecord("new", "file:///new")  # preparing: no order yet
    state.models["m"] = ModelRecord("m", "file:///m", state="ready")
    accept_all(state, job("first", 9, model="new"), job("other", 0, model="m"))
    assert [p.job.job.job_id for p in state.place()] == ["other"]  # not held up behind it
    state.models["new"].state = "ready"
    assert [p.job.job.job_id for p in state.place()] == ["first"]


def test_a_job_its_loader_stops_reporting_is_lost_after_the_timeout() -> None:
    """A loader that reconnected or restarted under its id no longer runs the job: once its
    reports have left the job out for the loader timeout, the job is given up."""
    state = State(loader_timeout_s=5.0)
    loader(state, "L")
    accept_all(state, job("a"), job("b"))
    state.place()
    placed = state.loaders["L"].running
    assert placed == {"a"}

    def report(*running: str) -> None:
        state.heartbeat(
            LoaderStatus(
                loader_id="L",
                node="n",
                resident=[],
                slots=1,
                busy=0,
                at=time.time(),
                running=list(running),
            )
        )

    report()  # sent before the job arrived: not yet a loss
    start = state.loaders["L"].unreported["a"]
    assert state.vanished("L", now=start + 4.9) == []
    report("a")  # it is running after all
    assert state.loaders["L"].unreported == {}
    report()
    report()
    since = state.loaders["L"].unreported["a"]
    assert [r.job.job_id for r in state.vanished("L", now=since + 5.0)] == ["a"]
