"""A real NuroPb (nuropb==0.1.8) service for the interop tests.

usage: service.py AMQP_URL SERVICE_NAME
Prints READY once it consumes its queue; runs until stdin closes.
"""
import asyncio
import base64
import json
import logging
import sys

from nuropb.contexts.context_manager_decorator import nuropb_context
from nuropb.contexts.describe import publish_to_mesh
from nuropb.rmq_api import RMQAPI


def claims_of(token):
    """What a service's authorize_func sees: the raw bearer token. Decoded
    without verification: the point is that the gateway forwarded it."""
    if not token or token.count(".") != 2:
        raise ValueError("no bearer token in the context")
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))


class Interop:
    _service_name = "interop"

    def hello(self, name: str) -> str:
        return f"hello {name}"

    def add(self, a: int, b: int) -> int:
        return a + b

    def exact(self) -> dict:
        # What a Value would change: key order, an integer beyond f64, an escape.
        return {"b": 1, "a": 10**30, "s": "\u00e9"}

    def params_seen(self, **params) -> dict:
        # What reached the service: the keys in their order, and a value.
        return {"keys": list(params), "big": params.get("big")}

    def boom(self) -> None:
        raise ValueError("boom from python")

    async def nap(self, ms: int = 1000) -> int:
        await asyncio.sleep(ms / 1000)
        return ms

    @nuropb_context
    def trace(self, ctx) -> dict:
        # What a service that joins its logs to the browser's trace reads.
        return {"trace_id": ctx.context.get("trace_id"), "traceparent": ctx.context.get("traceparent")}

    @nuropb_context
    @publish_to_mesh(authorize_func=claims_of)
    def whoami(self, ctx) -> dict:
        return {"sub": ctx.user_claims.get("sub"), "user_id": ctx.context.get("user_id")}


async def main(url, name):
    service = Interop()
    service._service_name = name
    # Several requests at once (nuropb's default prefetch is 1), so that a
    # composed route's parts can be seen to run concurrently.
    api = RMQAPI(amqp_url=url, service_name=name, instance_id=None, service_instance=service,
                 transport_settings={"prefetch_count": 16})
    await api.connect()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await api.disconnect()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
