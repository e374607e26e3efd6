"""`POST /v1/images/generations` (OpenAI's images API) over an `ImagePipeline`.

OpenAI's fields: prompt, n, size ("WxH", the one size the artifact was compiled for),
response_format (b64_json only: the server keeps no files to link to); relaxlm's: seed,
steps, guidance_scale, negative_prompt. A prompt longer than the text encoder reads is cut as
diffusers cuts it, and the response says so in the `x-relaxlm-prompt-truncated` header.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


def create_image_app(
    pipeline: ImagePipeline, served_model_name: str = "stable-diffusion"
) -> FastAPI:
    app = FastAPI(title="relaxlm images")
    lock = threading.Lock()  # one generation at a time: the entries are not re-entrant
    size = f"{pipeline.width}x{pipeline.height}"

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
        if body.model not in (None, served_model_name):
            raise ApiError(
                404, f"model {body.model!r} is not served here", "model", "model_not_found"
            )
        if not body.prompt.strip():
            raise ApiError(400, "prompt must not be empty", "prompt")
        if not 1 <= body.n <= MAX_N:
            raise ApiError(400, f"n must be between 1 and {MAX_N}, got {body.n}", "n")
        if body.size not in (None, size):
            raise ApiError(
                400, f"size {body.size!r} is not available: this model makes {size} images", "size"
            )
        if body.response_format != "b64_json":
            raise ApiError(
                400,
                "response_format must be 'b64_json' (the server keeps no image files)",
                "response_format",
            )
        if not 1 <= body.steps <= 1000:
            raise ApiError(400, f"steps must be between 1 and 1000, got {body.steps}", "steps")

        def run():
            with lock:
                return pipeline.generate(
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
        data = []
        for image in result.images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data.append({"b64_json": base64.b64encode(buf.getvalue()).decode()})
        headers = {"x-relaxlm-prompt-truncated": "true"} if result.truncated else None
        return JSONResponse({"created": int(time.time()), "data": data}, headers=headers)

    return app
