"""Delete the durable service queues a test run left on the local broker.

Every mesh service and BFF the suite starts declares a durable
`nuropb-<name>-sq` queue, most under a unique name, and a durable queue
outlives its service: without this, each run of the suite left about 60
idle queues behind on a developer's broker. A BFF also declares its event
log, the stream `nuropb-bff-<name>-events`, and the log's ledger
`nuropb-bff-<name>-events-bindings`: each stream keeps files open in the
broker, and some hundred left by earlier runs ran the broker out of file
descriptors (it then failed every declare with INTERNAL_ERROR).

Usage: sweep-test-queues.py BEFORE AFTER, two files listing the broker's
queue names (one per line) before and after the run. A queue is deleted
only when it appeared during the run, is named like a service queue, and
the broker agrees it has no consumer (`if_unused`): a service that is
still running keeps its queue. A queue under a fixed name must also hold
no message (`if_empty`); one under a run's unique name (`-<8 or 12 hex
digits>-sq`, as `tests/common::unique` and the benches make them) is
deleted with what a test left in it, since nothing will ever read it.
(Two suites run at once against one broker can see each other's queues
as new: a queue the other run is between two consumers of may go.)
"""

import os
import re
import sys

import pika
from pika.exceptions import AMQPError, ChannelClosedByBroker

SERVICE_QUEUE = re.compile(r"^nuropb-[A-Za-z0-9._-]+-(sq|events|events-bindings)$")
UNIQUE = re.compile(r"-([0-9a-f]{8}|[0-9a-f]{12})-(sq|events|events-bindings)$")


def names(path):
    with open(path, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip()}


def main():
    if len(sys.argv) != 3:
        print("usage: sweep-test-queues.py BEFORE AFTER", file=sys.stderr)
        return 2
    before, after = names(sys.argv[1]), names(sys.argv[2])
    new = sorted(q for q in after - before if SERVICE_QUEUE.match(q))
    if not new:
        return 0
    url = os.environ.get("BFF_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
    except AMQPError as e:
        print(f"sweep: could not connect to {url}: {e!r}; {len(new)} test queues left", file=sys.stderr)
        return 0
    deleted, kept = 0, []
    channel = conn.channel()
    for queue in new:
        try:
            channel.queue_delete(queue, if_unused=True, if_empty=not UNIQUE.search(queue))
            deleted += 1
        except ChannelClosedByBroker as e:
            # 406: in use or not empty; 404: already gone. Either way the
            # broker closed the channel: open another for the next one.
            if e.reply_code != 404:
                kept.append(queue)
            channel = conn.channel()
    conn.close()
    print(f"sweep: deleted {deleted} service queues this run declared", file=sys.stderr)
    if kept:
        print(f"sweep: kept {len(kept)} in use or holding messages: {', '.join(kept)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
