"""Operator routes: drain a worker or node before it goes away, list the workers (behind the API key)."""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from .http_errors import error_response
from .service import GenerationService


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str = Field(min_length=1, max_length=256, description="worker id, Ray node id or host name")
    deadline_s: float = Field(30.0, gt=0, le=3600, description="seconds until the node goes away")


class AddWorkerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["prefill", "decode"]


def install_admin_routes(app: FastAPI, service: GenerationService) -> None:
    @app.post("/admin/drain")
    async def drain(body: DrainRequest):
        if not hasattr(service, "drain"):
            return error_response(400, "this server runs one in-process engine (--embedded); there is nothing "
                                       "to drain", "target")
        try:
            return await service.drain(body.target, body.deadline_s)
        except LookupError as e:
            return error_response(404, str(e), "target")

    @app.get("/admin/workers")
    async def workers():
        return {"workers": service.workers() if hasattr(service, "workers") else []}

    @app.post("/admin/workers")
    async def add_worker(body: AddWorkerRequest):
        if not hasattr(service, "add_worker"):
            return error_response(400, "this server has no worker pools (--embedded)", "role")
        return await service.add_worker(body.role)

    @app.delete("/admin/workers/{worker_id}")
    async def remove_worker(worker_id: str, deadline_s: float = 30.0):
        if not hasattr(service, "remove_worker"):
            return error_response(400, "this server has no worker pools (--embedded)", "worker_id")
        if not 0 < deadline_s <= 3600:
            return error_response(400, "deadline_s must be in (0, 3600]", "deadline_s")
        try:
            return await service.remove_worker(worker_id, deadline_s)
        except LookupError as e:
            return error_response(404, str(e), "worker_id")
