"""Serving an `ImagePipeline`: `POST /v1/images/generations` (OpenAI's images API), and with
options a web page at /ui (ui/images.html) and the MCP `generate_image` tool at /mcp
(mcp_server.McpImageServer).

OpenAI's fields: prompt, n, size ("WxH", the one size the artifact was compiled for),
response_format (b64_json only: the server keeps no files to link to); relaxlm's: seed,
steps, guidance_scale, negative_prompt. A prompt longer than the text encoder reads is cut as
diffusers cuts it, and the response says so in the `x-relaxlm-prompt-truncated` header.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from relaxlm.errors import RelaxlmError
from relaxlm.image_generation import ImagePipeline

from .completions import ApiError

MAX_N = 4


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    seed: int = 0
    steps: int = 25
    guidance_scale: float | None = None  # the pipeline's default (SD 7.5, FLUX 3.5)
    negative_prompt: str = ""


class ImageService:
    """What every surface of the image server shares: the pipeline, its one-at-a-time lock
    (the compiled entries are not re-entrant) and the request checks, so /v1, /ui and /mcp
    answer a request alike."""

    Request = ImageRequest

    def __init__(self, pipeline: ImagePipeline, name: str):
        self.pipeline, self.name = pipeline, name
        self.size = f"{pipeline.width}x{pipeline.height}"
        self._lock = threading.Lock()

    def check(self, body: ImageRequest) -> None:
        """Raise the 4xx ApiError a bad request gets, naming the field."""
        if body.model not in (None, self.name):
            raise ApiError(
                404, f"model {body.model!r} is not served here", "model", "model_not_found"
            )
        if not body.prompt.strip():
            raise ApiError(400, "prompt must not be empty", "prompt")
        if not 1 <= body.n <= MAX_N:
            raise ApiError(400, f"n must be between 1 and {MAX_N}, got {body.n}", "n")
        if body.size not in (None, self.size):
            raise ApiError(
                400,
                f"size {body.size!r} is not available: this model makes {self.size} images",
                "size",
            )
        if body.response_format != "b64_json":
            raise ApiError(
                400,
                "response_format must be 'b64_json' (the server keeps no image files)",
                "response_format",
            )
        if not 1 <= body.steps <= 1000:
            raise ApiError(400, f"steps must be between 1 and 1000, got {body.steps}", "steps")

    async def generate(self, body: ImageRequest) -> tuple[list[bytes], bool]:
        """The checked request's images as PNG bytes, and whether its prompt was cut."""
        self.check(body)

        def run():
            with self._lock:
                return self.pipeline.generate(
                    body.prompt,
                    n=body.n,
                    steps=body.steps,
                    guidance_scale=body.guidance_scale,
                    seed=body.seed,
                    negative_prompt=body.negative_prompt,
                )

        try:
            result = await asyncio.to_thread(run)
        except RelaxlmError as e:
            raise ApiError(400, str(e)) from e
        pngs = []
        for image in result.images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return pngs, result.truncated

    def model_card(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "owned_by": "relaxlm",
            "task": "image-generation",
            "size": self.size,
            "max_n": MAX_N,
        }


def create_image_app(
    pipeline: ImagePipeline,
    served_model_name: str = "stable-diffusion",
    *,
    mcp: bool = False,
    ui: bool = False,
) -> FastAPI:
    """mcp: also the MCP `generate_image` tool at /mcp; ui: the image page at /ui."""
    service = ImageService(pipeline, served_model_name)
    mcp_server = None
    if mcp:
        from .mcp_server import McpImageServer

        mcp_server = McpImageServer(service)
    app = FastAPI(title="relaxlm images", lifespan=functools.partial(_lifespan, mcp_server))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return JSONResponse(ApiError(400, first["msg"], param).body(), status_code=400)

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest):
        pngs, truncated = await service.generate(body)
        data = [{"b64_json": base64.b64encode(png).decode()} for png in pngs]
        headers = {"x-relaxlm-prompt-truncated": "true"} if truncated else None
        return JSONResponse({"created": int(time.time()), "data": data}, headers=headers)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    if mcp_server is not None:
        app.router.routes.extend(mcp_server.http_routes())
    if ui:

        @app.get("/ui", include_in_schema=False)
        @app.get("/ui/", include_in_schema=False)
        async def page():
            return RedirectResponse("/ui/images.html")

        app.mount("/ui", StaticFiles(directory=Path(__file__).parent / "ui"), "ui")
    return app


@asynccontextmanager
async def _lifespan(mcp_server, app: FastAPI) -> AsyncIterator[None]:
    """Run /mcp's session manager while serving."""
    if mcp_server is None:
        yield
        return
    async with mcp_server.sessions():
        yield


def run_stdio(pipeline: ImagePipeline, model_name: str) -> None:
    """Serve the MCP `generate_image` tool over stdio (`relaxlm mcp` on a diffusion artifact)."""
    from .mcp_server import McpImageServer

    McpImageServer(ImageService(pipeline, model_name)).server.run("stdio")
