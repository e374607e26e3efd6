"""The OpenAI text-to-speech route: `POST /v1/audio/speech` (JSON: model, input, voice,
response_format, speed) onto the SDK's `speak()`; the answer is the encoded audio itself.
One synthesis runs at a time through the VM."""

import asyncio
import threading
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import Field

from relaxlm.errors import RelaxlmError
from relaxlm.server import schemas
from relaxlm.server.completions import ApiError, ModelContext

MAX_INPUT_CHARS = 4096  # OpenAI's limit on `input`


class SpeechRequest(schemas._Request):
    model: str
    input: str = Field(max_length=MAX_INPUT_CHARS)
    voice: str = "alloy"
    response_format: Literal["mp3", "opus", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None  # steers OpenAI's gpt-4o voices; VITS has no such input


_AUDIO = {"content": {"audio/*": {"schema": {"type": "string", "format": "binary"}}}}


def add_speech_route(app: FastAPI, ctx: ModelContext) -> None:
    lock = threading.Lock()

    @app.post(
        "/v1/audio/speech",
        responses={200: _AUDIO, **schemas.GENERATION_ERRORS},
        response_class=Response,
    )
    async def speech(body: SpeechRequest):
        ctx.check_model(body.model)
        if not ctx.is_synthesizer:
            raise ApiError(
                400,
                f"{ctx.name} is not a text-to-speech model: it cannot speak; serve a VITS / "
                "MMS-TTS model (VitsModel)",
                "model",
            )
        from relaxlm.tts import MEDIA_TYPES, audio_bytes

        def speak():
            with lock:
                result = ctx.llm.speak(body.input, voice=body.voice, speed=body.speed)
            return audio_bytes(result, body.response_format)

        try:
            data = await asyncio.to_thread(speak)
        except RelaxlmError as e:
            field = "voice" if "voice" in str(e) else "input"
            raise ApiError(400, str(e), field) from e
        return Response(data, media_type=MEDIA_TYPES[body.response_format])
