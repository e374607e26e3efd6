"""The OpenAI audio routes: `POST /v1/audio/transcriptions` and `/v1/audio/translations`
(multipart upload: file, model, language, prompt, response_format, temperature) onto the
SDK's `transcribe()`. One transcription runs at a time through the VM."""

import asyncio
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from relaxlm.errors import RelaxlmError
from relaxlm.server import schemas
from relaxlm.server.completions import ApiError, ModelContext

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def add_audio_routes(app: FastAPI, ctx: ModelContext) -> None:
    lock = threading.Lock()

    async def run(request: Request, task: str):
        form = await _form(request)
        ctx.check_model(form.get("model"))
        if not ctx.is_speech:
            raise ApiError(
                400,
                f"{ctx.name} is not a speech model: it cannot transcribe audio; serve a Whisper "
                "model (WhisperForConditionalGeneration)",
                "model",
            )
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "the request has no audio file (multipart field 'file')", "file")
        data = await upload.read()
        fmt = form.get("response_format") or "json"
        if fmt not in FORMATS:
            raise ApiError(
                400,
                f"response_format {fmt!r} is not one of {', '.join(FORMATS)}",
                "response_format",
            )
        try:
            temperature = float(form.get("temperature") or 0.0)
        except ValueError:
            raise ApiError(400, "temperature must be a number", "temperature") from None
        options = dict(
            language=form.get("language") or None,
            task=task,
            timestamps=fmt in ("srt", "vtt", "verbose_json"),
            temperature=temperature,
            prompt=form.get("prompt") or None,
        )

        def transcribe():
            with lock:
                return ctx.llm.transcribe(data, **options)

        try:
            result = await asyncio.to_thread(transcribe)
        except RelaxlmError as e:
            raise ApiError(400, f"{upload.filename or 'the file'}: {e}", "file") from e
        return _response(result, fmt, ctx.llm.model.text, task)

    @app.post("/v1/audio/transcriptions", responses=schemas.GENERATION_ERRORS)
    async def transcriptions(request: Request):
        return await run(request, "transcribe")

    @app.post("/v1/audio/translations", responses=schemas.GENERATION_ERRORS)
    async def translations(request: Request):
        return await run(request, "translate")


async def _form(request: Request):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "the audio routes take multipart/form-data (a 'file' and 'model')")
    try:
        return await request.form()
    except (ValueError, AssertionError) as e:
        raise ApiError(400, f"the multipart body is malformed ({e})") from e


def _response(result, fmt: str, text_of, task: str):
    text = result.text.strip()
    if fmt == "json":
        return JSONResponse({"text": text})
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    if fmt == "verbose_json":
        segments = [
            {
                "id": i,
                "seek": 0,
                "start": round(s.start, 2),
                "end": round(s.end, 2),
                "text": text_of(s.tokens),
                "tokens": s.tokens,
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for i, s in enumerate(result.segments)
        ]
        return JSONResponse(
            {
                "task": task,
                "language": result.language or "english",
                "duration": round(result.duration, 3),
                "text": text,
                "segments": segments,
            }
        )
    cues = []
    for i, s in enumerate(result.segments):
        start, end = _clock(s.start, fmt), _clock(s.end, fmt)
        cue = f"{start} --> {end}\n{text_of(s.tokens).strip()}\n"
        cues.append(f"{i + 1}\n{cue}" if fmt == "srt" else cue)
    body = "\n".join(cues)
    return PlainTextResponse(("WEBVTT\n\n" + body) if fmt == "vtt" else body)


def _clock(seconds: float, fmt: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    sep = "," if fmt == "srt" else "."
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"
