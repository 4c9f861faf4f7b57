"""Fetching an `input_image`'s `https://` URL for a vision-language model, without becoming a proxy into the
server's own network (SSRF).

Off unless `--allow-image-urls`. Then, for each URL:
- only `https` on a host name or address; no credentials in the URL;
- the host is resolved here, and every address it resolves to must be public (`ipaddress.is_global`: not
  loopback, private, link-local, shared, reserved or multicast, IPv4-mapped IPv6 unwrapped first), unless
  `--allow-private-image-urls`; one bad address refuses the URL;
- the connection goes to the address checked, not to the name again: a second DNS answer (rebinding)
  cannot send it elsewhere. TLS still verifies the certificate against the host name (SNI);
- redirects are not followed (their target would escape the check); only a 200 is read;
- the body is read up to `max_bytes` and abandoned past it, and the whole fetch has one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import httpx


class ImageUrlRefused(Exception):
    def __init__(self, message: str, code: str = "invalid_image_url") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class UrlPolicy:
    enabled: bool
    allow_private: bool
    max_bytes: int
    timeout_s: float


async def fetch_image_url(url: str, policy: UrlPolicy) -> bytes:
    if not policy.enabled:
        raise ImageUrlRefused(
            "This server does not fetch image URLs (start it with --allow-image-urls): send the image as a "
            "base64 data URL, or upload it (POST /v1/files) and send its 'file_id'.",
            "unsupported_parameter",
        )
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ImageUrlRefused(f"Invalid image URL: {exc}") from exc
    if parsed.scheme != "https" or not parsed.host:
        raise ImageUrlRefused("Only https:// image URLs are fetched.")
    if parsed.userinfo:
        raise ImageUrlRefused("Image URLs with credentials are not fetched.")
    try:
        async with asyncio.timeout(policy.timeout_s):
            address = await _checked_address(parsed.host, parsed.port or 443, policy.allow_private)
            return await _download(parsed, address, policy.max_bytes)
    except TimeoutError as exc:
        raise ImageUrlRefused(f"Fetching the image took longer than {policy.timeout_s:g} s.") from exc
    except httpx.HTTPError as exc:
        raise ImageUrlRefused(f"The image could not be fetched: {type(exc).__name__}: {exc}") from exc


async def _checked_address(host: str, port: int, allow_private: bool) -> str:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ImageUrlRefused(f"The image URL's host '{host}' could not be resolved.") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise ImageUrlRefused(f"The image URL's host '{host}' has no address.")
    for address in addresses:
        if not allow_private and not _is_public(address):
            raise ImageUrlRefused(
                f"The image URL's host '{host}' resolves to {address}, which is not a public address; "
                "this server fetches images from public addresses only.",
                "image_url_forbidden",
            )
    return str(addresses[0])


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def _download(url: httpx.URL, address: str, max_bytes: int) -> bytes:
    pinned = url.copy_with(host=address)
    headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*"}
    # trust_env=False: no proxy from the environment, which would resolve the name again itself.
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        request = client.build_request("GET", pinned, headers=headers, extensions={"sni_hostname": url.host})
        response = await client.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise ImageUrlRefused(f"Fetching the image URL answered HTTP {response.status_code}.")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageUrlRefused(f"The image holds more than {max_bytes} bytes.", "image_too_large")
            received = bytearray()
            async for piece in response.aiter_bytes():
                received += piece
                if len(received) > max_bytes:
                    raise ImageUrlRefused(f"The image holds more than {max_bytes} bytes.", "image_too_large")
            return bytes(received)
        finally:
            await response.aclose()
