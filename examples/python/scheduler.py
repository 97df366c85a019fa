"""Schedules a job on tickd: `python scheduler.py QUEUE [SECONDS]` fires once, SECONDS from now.

Set TICKD_ADDR (default localhost:50051) to reach another server, and for a secured one
TICKD_CA_FILE, TICKD_CLIENT_CERT, TICKD_CLIENT_KEY, TICKD_TLS_SERVER_NAME, TICKD_TOKEN (see
tickd_api.connect).
"""

import sys

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc_status import rpc_status
from google.rpc import error_details_pb2

from tickd_api import connect, pb


def schedule_after(stub, queue, seconds, payload=b"", job_id=""):
    """Schedules a job that fires once, `seconds` from now; returns the Job."""
    job = pb.Job(
        id=job_id,
        queue=queue,
        trigger=pb.Trigger(after=Duration(seconds=seconds)),
        payload=payload,
        labels={"source": "python-example"},
    )
    return stub.Schedule(pb.ScheduleRequest(job=job), timeout=30)


def field_violations(error):
    """The (field, description) pairs of a refused request's google.rpc.BadRequest."""
    status = rpc_status.from_call(error)
    found = []
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.extend((v.field, v.description) for v in bad.field_violations)
    return found


def main():
    queue = sys.argv[1] if len(sys.argv) > 1 else "emails"
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    stub = connect()
    try:
        job = schedule_after(stub, queue, seconds, payload=b"hello from python")
    except grpc.RpcError as e:
        print(f"refused: {e.code().name}: {e.details()}", file=sys.stderr)
        for field, description in field_violations(e):
            print(f"  {field}: {description}", file=sys.stderr)
        sys.exit(1)
    print(f"scheduled {job.id} on {job.queue}, fires at {job.next_fire_time.ToJsonString()}")


if __name__ == "__main__":
    main()
