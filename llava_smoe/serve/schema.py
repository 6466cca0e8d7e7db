"""The OpenAI chat-completions request schema, its validation and image URL decoding.

Everything a client can get wrong becomes an `APIError` carrying an HTTP status and OpenAI's
error shape ({"error": {"message", "type", "param", "code"}}); nothing here touches the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
import time
from typing import Annotated, Any, Literal, Union
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_smoe.inference.sampling import RequestError, SamplingParams
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
    """The wire format. Sampling fields are typed here and checked by `SamplingParams` (the one
    place their ranges live); `ignore_eos` is vLLM's extension (generate through end-of-turn)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    stop: str | list[str] | None = Field(default=None, max_length=4)  # OpenAI: up to 4 sequences
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: Literal[1] = 1
    user: str | None = None
    ignore_eos: bool = False

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling_params(self) -> SamplingParams:
        """The request's sampling options; an invalid one is a 400 naming its field."""
        try:
            return SamplingParams(max_new_tokens=self.requested_max_tokens, temperature=self.temperature,
                                  top_p=self.top_p, stop=[self.stop] if isinstance(self.stop, str) else self.stop or [],
                                  seed=self.seed, ignore_eos=self.ignore_eos)
        except RequestError as e:
            param = "max_tokens" if e.param == "max_new_tokens" else e.param
            raise APIError(400, str(e), code="invalid_value", param=param) from None


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
    """GET an http(s) image from a public address. The host is resolved once and the connection
    goes to the address that was checked (the URL names it; the Host header and TLS SNI name the
    host), so a second lookup cannot point it elsewhere (DNS rebinding); no redirect is followed,
    no proxy from the environment is used, and size and total time are capped."""
    import httpx

    parsed = urlsplit(url)
    try:
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme.lower() == "https" else 80)
    except ValueError:
        raise APIError(400, "image URL has an invalid port", code="invalid_image_url", param=param) from None
    if not host:
        raise APIError(400, "image URL has no host", code="invalid_image_url", param=param)
    if parsed.username is not None or parsed.password is not None:
        raise APIError(400, "image URLs with credentials are refused", code="invalid_image_url", param=param)
    address = checked_address(host, port, limits, param)
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    target = urlunsplit((parsed.scheme, netloc, parsed.path or "/", parsed.query, ""))
    headers = {"Host": parsed.netloc}
    extensions = {"sni_hostname": host} if parsed.scheme.lower() == "https" else {}
    deadline = time.monotonic() + limits.remote_image_timeout_s
    try:
        with httpx.Client(timeout=limits.remote_image_timeout_s, follow_redirects=False, trust_env=False) as client:
            with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                if response.is_redirect:
                    raise APIError(400, f"the image URL redirects (HTTP {response.status_code}); redirects are not "
                                        "followed: give the final URL", code="image_fetch_failed", param=param)
                if response.status_code != 200:
                    raise APIError(400, f"fetching the image URL returned HTTP {response.status_code}",
                                   code="image_fetch_failed", param=param)
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    if total > limits.max_image_bytes:
                        raise _too_large(total, limits, param)
                    if time.monotonic() > deadline:
                        raise APIError(400, f"fetching the image took over {limits.remote_image_timeout_s} s",
                                       code="image_fetch_failed", param=param)
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as e:
        raise APIError(400, f"fetching the image URL failed: {type(e).__name__}", code="image_fetch_failed",
                       param=param) from None


def checked_address(host: str, port: int, limits: ServerLimits, param: str) -> str:
    """The address to connect to for `host`: every address it resolves to must be public
    (not loopback, private, link-local such as the cloud metadata address 169.254.169.254,
    multicast or reserved) unless the host is one of `limits.allowed_image_hosts`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise APIError(400, f"cannot resolve the image host {host!r}", code="image_fetch_failed", param=param) from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if host.lower().rstrip(".") not in limits.allowed_image_hosts:
        for address in addresses:
            kind = _internal_kind(ipaddress.ip_address(address))
            if kind:
                raise APIError(403, f"image host {host!r} resolves to {address}, a {kind} address; this server "
                                    "fetches images from public addresses only (--allow-private-image-host HOST "
                                    "allows a named host)", code="image_host_not_allowed", param=param,
                               type="permission_error")
    return addresses[0]


def _internal_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes `ip` internal ("loopback", "private", ...), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return _internal_kind(embedded)
    for kind in ("loopback", "link_local", "multicast", "private", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"


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
