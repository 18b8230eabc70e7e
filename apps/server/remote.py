"""Remote media (`--allow-remote-media`): fetching an http(s) URL a client gave without letting
the client reach what only the server can (server-side request forgery).

- The URL is checked before anything goes out: http or https, a host, no `user:pass@`
  credentials, and the host on the `--remote-media-hosts` allow-list when there is one.
- Each hop (the URL, then each redirect, at most `max_redirects`) is resolved once here, and
  every address it resolves to must be public (not loopback, private, link-local, multicast,
  reserved, shared or unspecified) unless an allow-list entry names its network. The connection
  then goes to that checked address (the name stays in the Host header and TLS's SNI), so a DNS
  answer that changes between the check and the connect (rebinding) cannot redirect it.
- One deadline covers the whole fetch, redirects and a server that drips its bytes included,
  and it never runs past the request's own deadline; the body is capped at `max_bytes`.
- Whatever fails once the network is involved (the name, the address, the connect, the status,
  the size, the time) gives the client the same one error, so it cannot map the server's
  network; the reason goes to the server's log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
import time
from urllib.parse import urljoin, urlsplit

import httpx

from .errors import APIError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(Exception):
    """Why a fetch did not happen (for the log, never for the client)."""


class AllowList:
    """`--remote-media-hosts` entries: a host name (`images.example.com`), a suffix of subdomains
    (`.example.com` or `*.example.com`), or an IP network or address (`10.0.0.0/8`, whose
    private addresses are then allowed too). Empty: any host with public addresses."""

    def __init__(self, entries=()):
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[Network] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith(("*.", ".")):
                self.suffixes.append("." + entry.lstrip("*."))
            else:
                self.names.add(entry)

    @property
    def empty(self) -> bool:
        return not (self.names or self.suffixes or self.networks)

    def host_allowed(self, host: str) -> bool:
        if self.empty:
            return True
        if host in self.names or any(host.endswith(s) for s in self.suffixes):
            return True
        ip = _literal(host)
        return ip is not None and self.in_networks(ip)

    def in_networks(self, ip: Address) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)

    def address_allowed(self, ip: Address) -> bool:
        ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
        if self.in_networks(ip):
            return True
        return ip.is_global and not ip.is_multicast and not ip.is_reserved


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver); tests replace this."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def check_url(url: str, kind: str, allow: AllowList, param: str) -> None:
    """The checks that need no network (their errors say what is wrong: they reveal nothing)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise APIError(400, f"the {kind} URL is not a valid URL", param, "invalid_media") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise APIError(400, f"the {kind} URL must be http(s)://HOST/...", param, "invalid_media")
    if parts.username is not None or parts.password is not None:
        raise APIError(400, f"the {kind} URL may not carry credentials (user:password@)", param, "invalid_media")
    if port == 0:
        raise APIError(400, f"the {kind} URL's port is not valid", param, "invalid_media")
    if not allow.host_allowed(parts.hostname.lower()):
        raise APIError(400, f"the {kind} URL's host is not one this server fetches from (--remote-media-hosts)",
                       param, "remote_host_not_allowed")


async def fetch(url: str, kind: str, param: str, allow: AllowList, max_bytes: int, timeout_s: float,
                deadline: float, max_redirects: int = 3) -> tuple[bytes, str | None]:
    """The bytes behind `url` and their Content-Type, or a 400 that says only that it failed
    (a 504 when the request's own deadline, `deadline` in time.monotonic(), ran out first)."""
    check_url(url, kind, allow, param)
    left = min(timeout_s, deadline - time.monotonic())
    try:
        async with asyncio.timeout(max(0.0, left)):
            return await _fetch(url, allow, max_bytes, max_redirects)
    except (Refused, httpx.HTTPError, OSError, TimeoutError, ValueError, UnicodeError) as e:
        print(f"edge-vlm serve: remote {kind} not fetched: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    if time.monotonic() >= deadline:
        raise APIError(504, "the request ran past the server's --request-timeout", None, "timeout")
    raise APIError(400, f"the {kind} URL could not be fetched", param, "media_fetch_failed")


async def _fetch(url: str, allow: AllowList, max_bytes: int, max_redirects: int) -> tuple[bytes, str | None]:
    # trust_env=False: no proxy from the environment (it would make the connection, not the checked address)
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=None) as client:
        for _ in range(max_redirects + 1):
            request = await _pinned_request(client, url, allow)
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    url = urljoin(url, response.headers["location"])
                    try:
                        check_url(url, "media", allow, "")
                    except APIError as e:
                        raise Refused(f"redirect to {url}: {e.message}") from None
                    continue
                if response.status_code != 200:
                    raise Refused(f"HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise Refused(f"Content-Length {declared} over {max_bytes}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise Refused(f"body over {max_bytes} bytes")
                return bytes(data), response.headers.get("content-type", "").split(";")[0].strip() or None
            finally:
                await response.aclose()
    raise Refused(f"more than {max_redirects} redirects")


async def _pinned_request(client: httpx.AsyncClient, url: str, allow: AllowList) -> httpx.Request:
    """A GET of `url` addressed to one checked address of its host (Host header and SNI keep the name)."""
    parts = urlsplit(url)
    host = parts.hostname.lower()
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    literal = _literal(host)
    addresses = [str(literal)] if literal is not None else await resolve(host, port)
    if not addresses:
        raise Refused(f"{host} resolves to nothing")
    for a in addresses:  # every address, not just the first: the resolver may rotate them
        if not allow.address_allowed(ipaddress.ip_address(a.split("%")[0])):
            raise Refused(f"{host} resolves to {a}, which this server does not fetch from")
    ip = addresses[0]
    netloc = f"[{ip}]" if ":" in ip else ip
    target = parts._replace(netloc=f"{netloc}:{port}").geturl()
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    extensions = {"sni_hostname": parts.hostname} if parts.scheme.lower() == "https" else {}
    return client.build_request("GET", target, headers={"Host": host_header, "Accept": "image/*, video/*"},
                                extensions=extensions)
