"""A real NuroPb (nuropb==0.1.8) service that listens to events, for the
lifecycle tests: bound to the topic patterns given, it prints each event it
receives as one JSON line.

usage: listener.py AMQP_URL SERVICE_NAME PATTERN [PATTERN ...]
Prints READY once it consumes; runs until stdin closes.
"""
import asyncio
import json
import logging
import sys

from nuropb.rmq_api import RMQAPI


class Listener:
    _service_name = "listener"

    def _handle_event_(self, topic, event, target=None, context=None, trace_id=None):
        # nuropb 0.1.8 calls this without awaiting it.
        print(json.dumps({"topic": topic, "event": event}), flush=True)


async def main(url, name, patterns):
    service = Listener()
    service._service_name = name
    api = RMQAPI(amqp_url=url, service_name=name, instance_id=None, service_instance=service,
                 transport_settings={"event_bindings": patterns})
    await api.connect()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await api.disconnect()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
