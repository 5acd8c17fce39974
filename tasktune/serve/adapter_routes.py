"""The adapter routes of the causal API: list, load and unload adapters, with vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter beside tasktune's own."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from tasktune.serve import schemas as s
from tasktune.serve.adapter_pool import AdapterPool
from tasktune.serve.api_app import APIError


def add_adapter_routes(app: FastAPI, pool: AdapterPool, auth: list) -> None:
    """GET/POST /v1/adapters, DELETE /v1/adapters/{name} and vLLM's two routes on `app`;
    loading over HTTP needs the pool's adapter root (else 403)."""

    def adapter_out(name: str) -> s.AdapterOut:
        i = pool.info(name)
        return s.AdapterOut(name=i.name, rank=i.rank, scaling=i.scaling, target_modules=list(i.modules),
                            base_model=i.base_model)

    @app.get("/v1/adapters", response_model=list[s.AdapterOut], dependencies=auth)
    async def list_adapters():
        return [adapter_out(n) for n in pool.names()]

    @app.post("/v1/adapters", response_model=s.AdapterOut, status_code=201, dependencies=auth)
    async def load_adapter(body: s.AdapterLoadRequest):
        if pool.root is None:
            raise APIError(403, "loading adapters over HTTP is disabled: the server has no adapter root",
                           "permission_error")
        pool.register(body.name, body.path)
        return adapter_out(body.name)

    @app.delete("/v1/adapters/{name}", dependencies=auth)
    async def unload_adapter(name: str):
        pool.unregister(name)
        return {"deleted": name}

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, dependencies=auth)
    async def vllm_load_adapter(body: s.LoraLoadRequest):
        """vLLM's route and answer for loading an adapter (the same checks as POST /v1/adapters)."""
        await load_adapter(s.AdapterLoadRequest(name=body.lora_name, path=body.lora_path))
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, dependencies=auth)
    async def vllm_unload_adapter(body: s.LoraUnloadRequest):
        pool.unregister(body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
