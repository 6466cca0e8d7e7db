"""The OpenAI chat-completions request schema, its validation and image URL decoding.

Everything a client can get wrong becomes an `APIError` carrying an HTTP status and OpenAI's
error shape ({"error": {"message", "type", "param", "code"}}); nothing here touches the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Annotated, Any, Literal, Union
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_smoe.serve.config import ServerLimits


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, code=self.code, param=self.param, type=self.type)


def error_body(message: str, *, code: str, param: str | None = None, type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: Literal[1] = 1
    user: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def parse_request(payload: Any) -> ChatCompletionRequest:
    """A JSON value -> a validated request; the first problem is reported with its field path."""
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(payload).__name__}", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
            code = "unknown_parameter"
        else:
            message = f"{param}: {err['msg']}" if param else err["msg"]
            code = "invalid_value"
        raise APIError(400, message, code=code, param=param) from None


def message_parts(message: ChatMessage) -> tuple[str, list[tuple[str, str]]]:
    """(text, [(param path suffix, image url)]) of one message; text parts joined by newlines."""
    if isinstance(message.content, str):
        return message.content, []
    texts = [p.text for p in message.content if isinstance(p, TextPart)]
    urls = [(f"content.{i}.image_url.url", p.image_url.url)
            for i, p in enumerate(message.content) if isinstance(p, ImagePart)]
    return "\n".join(texts), urls


# -- images --------------------------------------------------------------------------------------
def image_bytes_from_url(url: str, limits: ServerLimits, param: str) -> bytes:
    """The raw bytes behind an image URL, under the limits: data URLs always; file:// under an
    allowed root; http(s) only when remote images are enabled."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url_bytes(url, limits, param)
    if scheme == "file":
        return _file_url_bytes(url, limits, param)
    if scheme in ("http", "https"):
        if not limits.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled on this server; send the image as a data URL "
                                "(data:image/png;base64,...)", code="remote_images_disabled", param=param)
        return _fetch_remote(url, limits, param)
    raise APIError(400, f"unsupported image URL scheme {scheme or url[:16]!r}; use a data URL", code="invalid_image_url",
                   param=param)


def _too_large(size: int, limits: ServerLimits, param: str) -> APIError:
    return APIError(413, f"image is {size} bytes, over the limit of {limits.max_image_bytes} bytes",
                    code="image_too_large", param=param)


def _data_url_bytes(url: str, limits: ServerLimits, param: str) -> bytes:
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, "image data URLs must be base64: data:image/<type>;base64,<data>", code="invalid_image_url",
                       param=param)
    if len(data) * 3 // 4 > limits.max_image_bytes + 2:  # refuse before decoding
        raise _too_large(len(data) * 3 // 4, limits, param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image data URL is not valid base64", code="invalid_image", param=param) from None
    if len(raw) > limits.max_image_bytes:
        raise _too_large(len(raw), limits, param)
    return raw


def _file_url_bytes(url: str, limits: ServerLimits, param: str) -> bytes:
    if not limits.file_url_roots:
        raise APIError(400, "file:// image URLs are disabled; start the server with --allow-file-urls DIR",
                       code="file_urls_disabled", param=param)
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"file URL host {parsed.netloc!r} is not local", code="invalid_image_url", param=param)
    path = os.path.realpath(unquote(parsed.path))  # resolves symlinks and '..' before the check
    if not any(os.path.commonpath([path, root]) == root for root in limits.file_url_roots):
        raise APIError(403, "file URL points outside the folders this server allows images from",
                       code="file_url_not_allowed", param=param, type="permission_error")
    if not os.path.isfile(path):
        raise APIError(400, "file URL does not name an existing file", code="invalid_image_url", param=param)
    size = os.path.getsize(path)
    if size > limits.max_image_bytes:
        raise _too_large(size, limits, param)
    with open(path, "rb") as f:
        return f.read()


def _fetch_remote(url: str, limits: ServerLimits, param: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.remote_image_timeout_s, follow_redirects=False) as response:
            if response.status_code != 200:
                raise APIError(400, f"fetching the image URL returned HTTP {response.status_code}",
                               code="image_fetch_failed", param=param)
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > limits.max_image_bytes:
                    raise _too_large(total, limits, param)
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise APIError(400, f"fetching the image URL failed: {type(e).__name__}", code="image_fetch_failed",
                       param=param) from None


def decode_image(raw: bytes, limits: ServerLimits, param: str) -> Image.Image:
    """Bytes -> a fully decoded PIL image; the pixel count is checked from the header, before decoding."""
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise APIError(413, f"image has too many pixels (limit {limits.max_image_pixels})", code="image_too_large",
                       param=param) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise APIError(400, "image could not be read: not a PNG, JPEG, WebP, GIF or other supported image",
                       code="invalid_image", param=param) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise APIError(413, f"image is {width}x{height} = {width * height} pixels, over the limit of "
                            f"{limits.max_image_pixels}", code="image_too_large", param=param)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError):
        raise APIError(400, "image is corrupt or truncated", code="invalid_image", param=param) from None
    return image
