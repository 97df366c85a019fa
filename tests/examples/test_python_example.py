"""The Python example against a real server: schedule, subscribe, receive, ack, cancel, and a
refused request whose field violation is read from the status details."""

import sys
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "python"))

import scheduler  # noqa: E402
import worker  # noqa: E402
from tickd_api import pb  # noqa: E402


def test_schedule_receive_ack_cancel(tickd_addr):
    stub = scheduler.connect(tickd_addr)
    job = scheduler.schedule_after(stub, "py.example", 1, b"hello", job_id="py-once")
    assert job.state == pb.JOB_STATE_SCHEDULED

    fires = []
    assert worker.work(stub, "py.example", 1, fires.append, timeout=30) == 1
    assert fires[0].job_id == "py-once"
    assert fires[0].payload == b"hello"
    assert fires[0].labels["source"] == "python-example"

    # Acked: a new subscriber gets nothing.
    opened = pb.SubscribeRequest(open=pb.SubscribeOpen(queue="py.example"))
    with pytest.raises(grpc.RpcError) as waited:
        for fire in stub.Subscribe(iter([opened]), timeout=0.7):
            pytest.fail(f"acked fire delivered again: {fire.fire_id}")
    assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    later = scheduler.schedule_after(stub, "py.example", 3600, job_id="py-later")
    cancelled = stub.CancelJob(pb.CancelJobRequest(id=later.id), timeout=30)
    assert cancelled.state == pb.JOB_STATE_CANCELLED


def test_refused_request_names_the_field(tickd_addr):
    stub = scheduler.connect(tickd_addr)
    bad = pb.Job(queue="py.example", trigger=pb.Trigger(cron=pb.Cron(expression="nope")))
    with pytest.raises(grpc.RpcError) as refused:
        stub.Schedule(pb.ScheduleRequest(job=bad), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [field for field, _ in scheduler.field_violations(refused.value)]
    assert "job.trigger.cron.expression" in fields
