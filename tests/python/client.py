"""A real NuroPb (nuropb==0.1.8) client for the interop tests: calls
SERVICE.METHOD with PARAMS_JSON and prints the result as one JSON line
(or {"error": ...} when the call raises).

usage: client.py AMQP_URL SERVICE METHOD PARAMS_JSON [CONTEXT_JSON]
"""
import asyncio
import json
import logging
import sys

from nuropb.rmq_api import RMQAPI


async def main(url, service, method, params, context):
    api = RMQAPI(amqp_url=url)
    await api.connect()
    try:
        result = await api.request(service=service, method=method, params=params,
                                   context=context, ttl=10_000, trace_id="interop-client")
        print(json.dumps({"result": result}), flush=True)
    except Exception as err:  # the test reads what went wrong
        # nuropb raises NuropbMessageError for any error response; the name
        # the service answered is in its payload.
        name = type(err).__name__
        payload = getattr(err, "payload", None)
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            name = payload["error"].get("error") or name
        print(json.dumps({"error": name, "description": str(err)}), flush=True)
    finally:
        await api.disconnect()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    context = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), context))
