"""Webhook URLs: what a request may name, where the service may send, and the one POST.

A webhook is a request the service makes for a user from inside the deployment's
network; unchecked, it reaches what only the service can reach (the cloud's metadata
endpoint, the database, Ray's dashboard): server-side request forgery. So:

- a URL is ``http`` or ``https``, printable ASCII (percent-encoded), at most
  `MAX_URL_LENGTH` characters, with a host and without credentials (``user:pass@``
  would be stored and shown like the rest of the URL; put a secret in the path, as
  Slack does); a numeric host is a dotted-decimal IPv4 address (``2130706433`` or
  ``0x7f.1`` would be 127.0.0.1 to the resolver);
- with ``notify_allowed_hosts`` set, the host must be one of them;
- every address the host stands for must be public, or inside
  ``notify_private_networks``: checked at submission for a literal address or
  ``localhost`` (a 422), and at every delivery for what the name resolves to then;
- the POST goes to the very address that was checked, with the URL's host as ``Host``
  and as TLS server name (no second lookup that DNS rebinding could answer otherwise);
  redirects are not followed; proxies of the environment are not used.

Webhook URLs often are secrets themselves (Slack's): responses and logs show them
`redacted`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Annotated
from urllib.parse import urlsplit

import httpx
from pydantic import AfterValidator, Field

from service.settings import Settings

MAX_URL_LENGTH = 2048
MAX_NOTIFY_URLS = 5
"""Webhooks per job: each gets every event of the job."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedDestinationError(ValueError):
    """The URL's host, or an address it resolves to, is one webhooks may not reach."""


class DeliveryError(Exception):
    """A POST that did not succeed; ``permanent`` when trying again cannot help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def _host(url: str) -> str:
    """The URL's host, lower case, without brackets or a final dot."""
    return (urlsplit(url).hostname or "").rstrip(".")


def _webhook_url(url: str) -> str:
    if not url.isascii() or not url.isprintable() or " " in url or "\\" in url:
        raise ValueError("a URL is printable ASCII without spaces or backslashes (percent-encode)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme {parts.scheme!r}: only http and https")
    if "@" in parts.netloc:
        raise ValueError("no user name or password in a webhook URL (user:password@host)")
    host = _host(url)
    if not host:
        raise ValueError("the URL has no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port is not a number from 1 to 65535")
    if ":" not in host and re.fullmatch(r"\d+|0x[0-9a-f]*", host.split(".")[-1]):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"host {host!r}: a numeric host is four decimal numbers (a.b.c.d)"
            ) from None
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ValueError(f"not a URL: {error}") from None
    if parsed.host.rstrip(".") != host:  # two parsers, one reading: no smuggled host
        raise ValueError("the URL's host is ambiguous")
    return url


def _distinct(urls: list[str]) -> list[str]:
    repeated = sorted({url for url in urls if urls.count(url) > 1})
    if repeated:
        raise ValueError(f"{len(repeated)} URL(s) given more than once")
    return urls


WebhookUrl = Annotated[
    str, Field(min_length=1, max_length=MAX_URL_LENGTH), AfterValidator(_webhook_url)
]
"""An http(s) webhook URL (syntax only: `destination_problem` checks where it leads)."""

NotifyUrls = Annotated[
    list[WebhookUrl], Field(max_length=MAX_NOTIFY_URLS), AfterValidator(_distinct)
]
"""A job's webhooks: a few distinct URLs."""


def redacted(url: str) -> str:
    """The URL as responses and logs show it: scheme, host, port and the first path
    segment; the rest (where secrets live) becomes ``…``."""
    parts = urlsplit(url)
    first, _, rest = parts.path.lstrip("/").partition("/")
    shown = f"{parts.scheme}://{parts.netloc}" + (f"/{first}" if first else "")
    return shown + ("/…" if rest or parts.query or parts.fragment else "")


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_problem(address: IPAddress, settings: Settings) -> str | None:
    """Why a webhook may not reach ``address`` (None: it may)."""
    address = _unmapped(address)
    if any(address in network for network in settings.notify_private_networks):
        return None
    if address.is_global and not address.is_multicast:
        return None
    return (
        f"{address} is not a public address (loopback, private, link-local or reserved); "
        "only networks in notify_private_networks may be reached so"
    )


def _host_allowed(host: str, allowed: list[str]) -> bool:
    for entry in (name.lower().rstrip(".") for name in allowed):
        if host == entry or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


def destination_problem(url: str, settings: Settings) -> str | None:
    """Why ``url`` may not be a webhook here, as far as the URL alone tells (None: it
    may; a host name's addresses are checked when it is resolved, at delivery)."""
    host = _host(url)
    if settings.notify_allowed_hosts and not _host_allowed(host, settings.notify_allowed_hosts):
        return f"host {host!r} is not one of notify_allowed_hosts"
    if host == "localhost" or host.endswith(".localhost"):
        return address_problem(ipaddress.IPv4Address("127.0.0.1"), settings)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return address_problem(address, settings)


def resolved_address(url: str, settings: Settings) -> IPAddress:
    """The address to send to: the first the host resolves to, once every one of them
    is allowed.

    Raises:
        RefusedDestinationError: the host or one of its addresses may not be reached.
        OSError: the name does not resolve (now).
    """
    problem = destination_problem(url, settings)
    if problem is not None:
        raise RefusedDestinationError(problem)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    found = socket.getaddrinfo(_host(url), port, type=socket.SOCK_STREAM)
    addresses = list(
        dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found)
    )
    if not addresses:
        raise OSError(f"{_host(url)} has no address")
    for address in addresses:
        problem = address_problem(address, settings)
        if problem is not None:
            raise RefusedDestinationError(f"{_host(url)} resolves to {problem}")
    return addresses[0]


def webhook_client(settings: Settings) -> httpx.Client:
    """The HTTP client of deliveries: short timeouts, no redirects, no proxies."""
    return httpx.Client(
        timeout=settings.notify_timeout_s,
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": "klssl-notifier"},
    )


def post_json(client: httpx.Client, url: str, body: object, settings: Settings) -> None:
    """POST ``body`` as JSON to ``url`` at an address `resolved_address` allows; a 2xx
    answer is success (its body is not read).

    Raises:
        DeliveryError: anything else; permanent for a refused destination, a redirect
            or a 4xx other than 408, 425 and 429.
    """
    try:
        address = resolved_address(url, settings)
    except RefusedDestinationError as error:
        raise DeliveryError(f"refused: {error}", permanent=True) from None
    except OSError as error:
        raise DeliveryError(f"cannot resolve {_host(url)}: {error}", permanent=False) from None
    target = httpx.URL(url)
    pinned = target.copy_with(host=str(address))
    try:
        with client.stream(
            "POST",
            pinned,
            json=body,
            headers={"Host": target.netloc.decode("ascii")},
            extensions={"sni_hostname": target.host},
        ) as response:
            status = response.status_code
    except httpx.HTTPError as error:
        message = str(error).replace(str(pinned), redacted(url)).replace(url, redacted(url))
        message = message or "no answer"
        raise DeliveryError(f"{type(error).__name__}: {message}", permanent=False) from None
    if 200 <= status < 300:
        return
    retry = status in (408, 425, 429) or status >= 500
    what = "a redirect (not followed)" if 300 <= status < 400 else f"HTTP {status}"
    raise DeliveryError(f"the receiver answered {what}", permanent=not retry)
