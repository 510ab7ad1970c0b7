"""The Starlette/uvicorn comparison for bench/run.sh: the generic webhook's work by hand (read the
body, compare the secret in constant time, parse JSON, answer JSON), as baseline_server.py does.

    python -m uvicorn --app-dir bench starlette_app:app --port PORT --workers N --no-access-log
"""

import hmac
import json
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

SECRET = os.environ.get("BENCH_SECRET", "bench-secret").encode()


async def generic(request):
    body = await request.body()
    if not hmac.compare_digest(request.headers.get("x-webhook-secret", "").encode(), SECRET):
        return JSONResponse({"success": False, "error": "unauthorized", "code": "unauthorized"}, status_code=401)
    req = json.loads(body)
    return JSONResponse({"success": True, "agent": req.get("agent", "default"), "response": req["message"],
                         "context": req.get("context", {}), "delivery_id": "x" * 32})


app = Starlette(routes=[Route("/api/webhooks/generic", generic, methods=["POST"])])
