"""A hostile (or buggy) peer on the broker, for tests/mesh_door.rs: it
publishes with pika, outside any nuropb library, what a well-behaved
service never would. Usage:

    peer.py URL event TOPIC KIND MIB      # KIND: string | numbers | small | badtopic
    peer.py URL request SERVICE CORRELATION_BYTES TRACE_BYTES [PAD_MIB]

`request` waits up to 3 s for an answer on a queue of its own and prints
it as JSON (or `null`).
"""

import json
import sys
import uuid

import pika

HEADERS = {
    "nuropb_protocol": "0.1.1",
    "nuropb_version": "hostile-peer",
    "encrypted": "",
}


def connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def big_event(topic, kind, mib):
    size = mib << 20
    if kind in ("small", "badtopic"):
        payload = b'{"n": 1}'
    elif kind == "string":
        payload = b'"' + b"x" * (size - 2) + b'"'
    else:
        # Small numbers: a JSON array of zeros, about `size` bytes.
        payload = b"[" + b"0," * (size // 2 - 1) + b"0]"
    # `badtopic`: the body names a topic other than its routing key, one
    # that would forge a line in a log.
    body_topic = topic + "\nFORGED log line" if kind == "badtopic" else topic
    head = json.dumps(
        {"tag": "event", "correlation_id": uuid.uuid4().hex, "topic": body_topic, "context": {}, "target": [], "trace_id": None}
    ).encode()
    # {"tag":..., ..., "event": <payload>}
    return head[:-1] + b', "event": ' + payload + b"}"


def main():
    url, what = sys.argv[1], sys.argv[2]
    conn = connect(url)
    ch = conn.channel()
    if what == "event":
        topic, kind, mib = sys.argv[3], sys.argv[4], int(sys.argv[5])
        body = big_event(topic, kind, mib)
        props = pika.BasicProperties(
            content_type="application/json",
            headers=dict(HEADERS, nuropb_type="event"),
        )
        ch.basic_publish("nuropb-events-exchange", topic, body, props)
        print(json.dumps({"published": len(body)}))
    elif what == "request":
        service, cid_bytes, trace_bytes = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        pad_mib = int(sys.argv[6]) if len(sys.argv) > 6 else 0
        reply = ch.queue_declare("", exclusive=True).method.queue
        correlation_id = "c" * cid_bytes if cid_bytes else uuid.uuid4().hex
        trace_id = "t" * trace_bytes if trace_bytes else uuid.uuid4().hex
        body = json.dumps(
            {
                "tag": "request",
                "correlation_id": correlation_id,
                "context": {},
                "trace_id": trace_id,
                "service": service,
                "method": "stats",
                "params": {"pad": "x" * (pad_mib << 20)} if pad_mib else {},
                "reply_to": reply,
            }
        ).encode()
        props = pika.BasicProperties(
            content_type="application/json",
            correlation_id=uuid.uuid4().hex,
            reply_to=reply,
            headers=dict(HEADERS, nuropb_type="request", trace_id=uuid.uuid4().hex),
        )
        ch.basic_publish("nuropb-rpc-exchange", service, body, props)
        answer = None
        for method, _props, data in ch.consume(reply, auto_ack=True, inactivity_timeout=3):
            if method is None:
                break
            answer = json.loads(data)
            break
        ch.cancel()
        print(json.dumps(answer))
    conn.close()


if __name__ == "__main__":
    main()
