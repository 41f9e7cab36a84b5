"""The smallest Serve app: a FastAPI deployment that reads a POST body and answers; Serve's own cost per request."""
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Echo:
    """Reads the body (as a completion handler must) and returns its size; no model, no engine."""

    @api.post("/echo")
    async def echo(self, request: Request) -> dict[str, Any]:
        """The body's length in bytes."""
        return {"bytes": len(await request.body())}
