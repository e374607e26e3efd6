"""The OpenAI audio routes: `POST /v1/audio/transcriptions` and `/v1/audio/translations`
(multipart upload: file, model, language, prompt, response_format, temperature, stream) onto
the SDK's `transcribe()`. One transcription runs at a time through the VM, in a worker thread,
so the event loop stays free for other requests meanwhile."""

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from relaxlm.errors import RelaxlmError
from relaxlm.server import schemas
from relaxlm.server.completions import ApiError, ModelContext

T = TypeVar("T")
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


class OneAtATime:
    """Runs blocking jobs in a worker thread, one after another. Waiting requests hold an
    asyncio lock, not a thread, so a queue of transcriptions never fills the thread pool that
    other routes' work runs on; a started job runs to its end even if its request goes away
    (the VM is never left mid-window, nor entered by two jobs)."""

    def __init__(self):
        self._lock = asyncio.Lock()

    async def __call__(self, job: Callable[[], T]) -> T:
        await self._lock.acquire()
        future = asyncio.ensure_future(asyncio.to_thread(job))
        future.add_done_callback(lambda _: self._lock.release())
        return await asyncio.shield(future)


def add_audio_routes(app: FastAPI, ctx: ModelContext) -> None:
    one_at_a_time = OneAtATime()

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
        stream = (form.get("stream") or "false").lower()
        if stream not in ("true", "false"):
            raise ApiError(400, f"stream must be true or false, not {stream!r}", "stream")
        if stream == "true" and fmt not in ("json", "text"):
            raise ApiError(
                400,
                f"stream=true sends text deltas; response_format {fmt!r} cannot stream (use "
                "json or text, or stream=false)",
                "response_format",
            )
        options = dict(
            language=form.get("language") or None,
            task=task,
            timestamps=fmt in ("srt", "vtt", "verbose_json"),
            temperature=temperature,
            prompt=form.get("prompt") or None,
        )
        if stream == "true":
            pieces = lambda: ctx.llm.transcribe(data, stream=True, **options)  # noqa: E731
            first = await _first_event(_events(pieces, one_at_a_time), upload.filename)
            return StreamingResponse(
                first, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        try:
            result = await one_at_a_time(lambda: ctx.llm.transcribe(data, **options))
        except RelaxlmError as e:
            raise ApiError(400, f"{upload.filename or 'the file'}: {e}", "file") from e
        return _response(result, fmt, ctx.llm.model.text, task)

    @app.post("/v1/audio/transcriptions", responses=schemas.TRANSCRIPTION_ANSWERS)
    async def transcriptions(request: Request):
        return await run(request, "transcribe")

    @app.post("/v1/audio/translations", responses=schemas.TRANSCRIPTION_ANSWERS)
    async def translations(request: Request):
        return await run(request, "translate")


def _events(pieces: Callable[[], Iterator[str]], one_at_a_time: OneAtATime) -> AsyncIterator[str]:
    """The SSE events of a streamed transcript: one `transcript.text.delta` per piece, then
    `transcript.text.done` with the whole text. When the client leaves, the worker stops after
    the window it is decoding (between windows the decoder holds no sequence)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def work() -> None:
        try:
            stream = pieces()  # decoding the upload included
            for piece in stream:
                if gone.is_set():
                    stream.close()
                    return
                loop.call_soon_threadsafe(queue.put_nowait, piece)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except Exception as e:  # handed to the event loop: a 400 or an error event
            loop.call_soon_threadsafe(queue.put_nowait, e)

    async def events() -> AsyncIterator[str]:
        worker = asyncio.ensure_future(one_at_a_time(work))
        text = []
        try:
            while (piece := await queue.get()) is not None:
                if isinstance(piece, Exception):
                    raise piece
                text.append(piece)
                yield _sse({"type": "transcript.text.delta", "delta": piece})
        finally:
            gone.set()
        await worker
        yield _sse({"type": "transcript.text.done", "text": "".join(text)})
        yield "data: [DONE]\n\n"

    return events()


async def _first_event(events: AsyncIterator[str], filename: str | None) -> AsyncIterator[str]:
    """Wait for the first event before answering, so bad audio is still a 400 (afterwards an
    error can only be an event)."""
    try:
        first = await anext(events)
    except RelaxlmError as e:
        raise ApiError(400, f"{filename or 'the file'}: {e}", "file") from e

    async def rest() -> AsyncIterator[str]:
        yield first
        try:
            async for event in events:
                yield event
        except RelaxlmError as e:
            body = {"error": {"message": str(e), "type": "invalid_request_error"}}
            yield _sse(body)

    return rest()


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


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
                "seek": s.seek,
                "start": round(s.start, 2),
                "end": round(s.end, 2),
                "text": text_of(s.tokens),
                "tokens": s.tokens,
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
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
