"""Receives a queue's fires from tickd and acks each: `python worker.py QUEUE [COUNT]`.

Set TICKD_ADDR (default localhost:50051) to reach another server, and for a secured one
TICKD_CA_FILE, TICKD_CLIENT_CERT, TICKD_CLIENT_KEY, TICKD_TLS_SERVER_NAME, TICKD_TOKEN (see
tickd_api.connect).
"""

import queue as queue_module
import sys

import grpc

from tickd_api import connect, pb


def work(stub, queue, count=None, handle=print, timeout=None):
    """Subscribes to `queue`, calls `handle(fire)` for each fire, then acks it (the unary Ack
    answers once the ack is stored). Returns after `count` fires (never when None). With
    `timeout` (seconds), the subscription ends with DEADLINE_EXCEEDED after that long."""
    outbox = queue_module.Queue()
    outbox.put(pb.SubscribeRequest(open=pb.SubscribeOpen(queue=queue, max_in_flight=10)))

    def requests():
        while True:
            request = outbox.get()
            if request is None:
                return
            yield request

    stream = stub.Subscribe(requests(), timeout=timeout)
    done = 0
    try:
        for fire in stream:
            handle(fire)
            stub.Ack(pb.AckRequest(queue=queue, fire_ids=[fire.fire_id]), timeout=30)
            done += 1
            if count is not None and done >= count:
                break
    finally:
        outbox.put(None)
        stream.cancel()
    return done


def main():
    queue = sys.argv[1] if len(sys.argv) > 1 else "emails"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else None

    def show(fire):
        print(f"fire {fire.fire_id} (attempt {fire.attempt}): {fire.payload!r}", flush=True)

    try:
        work(connect(), queue, count, show)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
