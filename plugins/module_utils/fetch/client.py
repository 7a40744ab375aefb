# PRIVATE to comfybake: not a public API; it may change without notice.
"""HTTP: one client with retries, auth by origin, redirects, and the probe of a source."""

from __future__ import annotations

import contextlib
import email.utils
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import (
    AuthError,
    ContentError,
    FetchError,
    HTTPStatusError,
    NotFoundError,
    RedirectError,
    TransferError,
)
from .manifest import (
    SHA256_HEX,
    Entry,
    display_url,
    filename_from_disposition,
    hf_repo,
    human,
    origin_of,
    parse_civitai_url,
)
from .options import Options, how_to_set

try:
    import requests
    from urllib3.exceptions import TimeoutError as _Urllib3Timeout

    HAS_REQUESTS = True
    REQUESTS_IMPORT_ERROR: ImportError | None = None
except ImportError as _error:  # pragma: no cover - reported by the module and CLI
    HAS_REQUESTS = False
    REQUESTS_IMPORT_ERROR = _error
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.IGNORECASE)


def timed_out(error: BaseException) -> bool:
    """A connect or read timeout, also when requests wraps urllib3's in a ConnectionError (mid-body)."""
    causes = (error, *error.args)
    return any(isinstance(cause, (requests.Timeout, _Urllib3Timeout, TimeoutError)) for cause in causes)


def raise_timeout() -> str:
    """What to do about a timeout: the setting to raise, as the user gives it."""
    return f"raise {how_to_set('timeout')} for a slow server or link, or run again"


def content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    """A Content-Range header as (first, last, total): `bytes 0-99/1000` -> (0, 99, 1000), an unsatisfied
    range `bytes */1000` -> (None, None, 1000), an unknown total `bytes 0-99/*` -> (0, 99, None); None
    when there is none or it is malformed."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not match:
        return None
    first, last, total = match.groups()
    return (
        None if first is None else int(first),
        None if last is None else int(last),
        None if total == "*" else int(total),
    )


def refuse_encoding(response: requests.Response, entry: Entry) -> None:
    """A model file must arrive as its exact bytes: refuse a body the server encoded although identity was asked."""
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding and encoding != "identity":
        raise ContentError(
            f"the server sent Content-Encoding {encoding} for {display_url(response.url or entry.url)} although "
            "identity was asked (Accept-Encoding: identity), so its bytes are not the file; ask its operator to "
            "serve this path unencoded (turn off on-the-fly compression) or fetch it from a mirror that does",
            entry.name,
        )


def size_error(received: int, announced: int, entry: Entry, action: str = "run again") -> FetchError:
    """Fewer bytes than announced: an incomplete read (retryable); more: the body is not the announced file."""
    if received < announced:
        return TransferError(f"incomplete read {human(received)} of {human(announced)}; {action}", entry.name)
    return ContentError(
        f"received {received} bytes, more than the {announced} the server announced for "
        f"{display_url(entry.url)}; the file changed on the server or something on the way altered it; "
        "run again, and tell the server's operator if it persists",
        entry.name,
    )


@dataclass
class Remote:
    """Where an entry's bytes come from, and what the source says about them."""

    url: str  # the URL to request first (origin or mirror)
    final_url: str | None = None  # after redirects, used for ranged requests
    size: int | None = None
    sha256: str | None = None  # published by the source (X-Linked-Etag, Civitai API)
    filename: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    ranges: bool = False
    content_type: str | None = None
    commit: str | None = None
    mirror: bool = False

    @property
    def validator(self) -> str | None:
        """The validator sent as If-Range: a strong ETag, else Last-Modified. Only with a hash to check
        does Last-Modified suffice: it is weak (RFC 9110 8.8.2.2), so without one see `strong_etag`."""
        return self.strong_etag or self.last_modified

    @property
    def strong_etag(self) -> str | None:
        """The one validator that proves ranges are of one representation without a hash: a strong ETag
        (a weak `W/` one is not, nor is Last-Modified)."""
        return self.etag if self.etag and not self.etag.startswith("W/") else None

    def validator_of(self, response: requests.Response) -> str | None:
        """The same kind of validator as `validator` (ETag or Last-Modified) in another response of the source."""
        if self.strong_etag:
            return response.headers.get("ETag")
        return response.headers.get("Last-Modified")


class Client:
    """requests with comfybake's rules: tokens only to their host, no downgrade, bounded retries."""

    def __init__(self, options: Options, warn: Callable[[str], None]) -> None:
        self.options = options
        self.warn = warn
        self._local = threading.local()

    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = True  # proxies from the environment
            session.headers["User-Agent"] = "comfybake-fetch/1"
            session.headers["Accept-Encoding"] = "identity"
            self._local.session = session
        return session

    def auth_headers(self, url: str, auth: str) -> dict[str, str]:
        """The token of `auth`, only when `url` is on that token's own host."""
        if auth == "hf":
            token, owner = self.options.hf_token, self.options.hf_endpoint
        elif auth == "civitai":
            token, owner = self.options.civitai_token, self.options.civitai_endpoint
        else:
            return {}
        if token and origin_of(url) == origin_of(owner):
            return {"Authorization": f"Bearer {token}"}
        return {}

    def request(
        self,
        method: str,
        url: str,
        entry: Entry,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        on_redirect: Callable[[requests.Response], None] | None = None,
    ) -> requests.Response:
        """One request with redirects followed by hand and retries for 408/429/5xx and broken connections."""
        attempt = 0
        while True:
            try:
                response = self._follow(method, url, entry, headers or {}, stream, on_redirect)
            except requests.exceptions.SSLError:
                raise FetchError(
                    f"TLS verification failed for {display_url(url)}; if a proxy re-signs TLS, "
                    "give its CA bundle with ca_bundle",
                    entry.name,
                ) from None
            except (requests.ConnectionError, requests.Timeout) as error:
                attempt += 1
                if attempt > self.options.retries and timed_out(error):
                    raise TransferError(
                        f"timed out: no answer from {display_url(url)} within {self.options.timeout:g} s, "
                        f"{attempt} attempts; {raise_timeout()}",
                        entry.name,
                    ) from None
                if attempt > self.options.retries:
                    raise TransferError(
                        f"network error from {display_url(url)} after {attempt} attempts: {type(error).__name__}; "
                        "check connectivity or proxies and run again",
                        entry.name,
                    ) from None
                self.sleep(attempt, None)
                continue
            except requests.RequestException as error:  # an invalid URL, scheme or header: not retried
                raise FetchError(
                    f"cannot request {display_url(url)}: {type(error).__name__}; check the url", entry.name
                ) from None
            if response.status_code in RETRY_STATUSES:
                attempt += 1
                if attempt > self.options.retries:
                    raise self.status_error(response, entry, attempts=attempt)
                wait = response.headers.get("Retry-After")
                response.close()
                self.sleep(attempt, wait)
                continue
            return response

    def _follow(
        self,
        method: str,
        url: str,
        entry: Entry,
        headers: Mapping[str, str],
        stream: bool,
        on_redirect: Callable[[requests.Response], None] | None,
    ) -> requests.Response:
        session = self.session()
        current = url
        for _hop in range(10):
            request_headers = dict(headers)
            request_headers.update(self.auth_headers(current, entry.auth))
            response = session.request(
                method,
                current,
                headers=request_headers,
                stream=stream,
                allow_redirects=False,
                timeout=(self.options.timeout, self.options.timeout),
                # per request: with trust_env, requests lets REQUESTS_CA_BUNDLE override the session's
                verify=self.options.ca_bundle or True,
            )
            if response.status_code not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
                response.url = current
                return response
            if on_redirect is not None:
                on_redirect(response)
            target = urllib.parse.urljoin(current, response.headers["Location"])
            response.close()
            old, new = urllib.parse.urlsplit(current).scheme, urllib.parse.urlsplit(target).scheme
            if old == "https" and new != "https":
                raise RedirectError(
                    f"refusing https→{new} redirect from {display_url(current)} to {display_url(target)}; "
                    "the source must stay on https",
                    entry.name,
                )
            if new not in ("https", "http"):
                raise RedirectError(f"refusing redirect to {new}: URL {display_url(target)}", entry.name)
            if new == "http" and not entry.allow_http:
                raise RedirectError(
                    f"refusing redirect to plain http ({display_url(target)}); set allow_http: true to permit it",
                    entry.name,
                )
            current = target
        raise RedirectError(f"too many redirects from {display_url(url)}", entry.name)

    def sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.options.backoff * 2 ** (attempt - 1), 30.0) * (0.5 + random.random() / 2)  # noqa: S311
        if retry_after:
            if retry_after.strip().isdigit():
                delay = float(retry_after.strip())
            else:
                with contextlib.suppress(TypeError, ValueError):
                    when = email.utils.parsedate_to_datetime(retry_after)
                    delay = max(0.0, when.timestamp() - time.time())
        time.sleep(min(delay, self.options.max_retry_wait))

    def status_error(self, response: requests.Response, entry: Entry, attempts: int = 1) -> FetchError:
        """The one place that turns an HTTP status into a message that says what to do."""
        status = response.status_code
        code = response.headers.get("X-Error-Code", "")
        request_id = response.headers.get("X-Request-Id") or response.headers.get("X-Amz-Request-Id")
        where = display_url(response.url or entry.url)
        sent_token = bool(self.auth_headers(response.url or entry.url, entry.auth))
        with contextlib.suppress(Exception):
            response.close()
        subject = where
        if entry.auth == "hf":
            subject = hf_repo(entry.url, self.options) or where
        elif entry.auth == "civitai" and entry.url.startswith("civitai://"):
            subject = f"civitai model version {parse_civitai_url(entry.url)}"
        if status == 401:
            if entry.auth == "hf" and code == "GatedRepo":
                return AuthError(
                    f"token missing or invalid for {subject}: it is a gated repository; set hf_token (or HF_TOKEN) "
                    f"to a token of an account that accepted its licence at https://huggingface.co/{subject}",
                    entry.name,
                )
            if not sent_token and entry.auth in ("hf", "civitai"):
                var = "hf_token (or HF_TOKEN)" if entry.auth == "hf" else "civitai_token (or CIVITAI_TOKEN)"
                return AuthError(
                    f"token missing or invalid for {subject} (401{', ' + code if code else ''}): set {var}; "
                    "HF also answers 401 for private or missing repos",
                    entry.name,
                )
            return AuthError(
                f"authentication failed for {subject} (401; HF also uses 401 for private or missing repos): "
                "check the token is current and the repository name",
                entry.name,
            )
        if status == 403:
            if entry.auth == "hf":
                return AuthError(
                    f"accept the licence at https://huggingface.co/{subject} with the account that owns this token "
                    "(403: the token is valid but not authorised for this gated repository)",
                    entry.name,
                )
            return AuthError(f"access denied (403) by {where}: check the token's permissions", entry.name)
        if status == 404:
            detail = f" ({code})" if code else ""
            return NotFoundError(
                f"repo/file not found (404{detail}) at {where}: check the url and revision", entry.name
            )
        suffix = f", request id {request_id}" if request_id else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return HTTPStatusError(f"HTTP {status} from {where}{tries}{suffix}; try again later", entry.name)

    def probe(self, remote: Remote, entry: Entry) -> None:
        """HEAD the source and read size, validators, HF headers. A server that refuses HEAD (405, 501) is
        asked for byte 0 (`Range: bytes=0-0`), and when it refuses that too (416 for an empty file, or no
        Range support) for the whole body with a GET whose body is never read."""

        def hub_headers(response: requests.Response) -> None:
            linked = response.headers.get("X-Linked-Etag", "").strip('"')
            if SHA256_HEX.match(linked):
                remote.sha256 = linked.lower()
            if response.headers.get("X-Linked-Size", "").isdigit():
                remote.size = int(response.headers["X-Linked-Size"])
            remote.commit = response.headers.get("X-Repo-Commit") or remote.commit

        response = self.request("HEAD", remote.url, entry, on_redirect=hub_headers)
        if response.status_code in (405, 501):
            response.close()
            response = self.request("GET", remote.url, entry, headers={"Range": "bytes=0-0"}, stream=True)
            if response.status_code not in (200, 206, 401, 403, 404):
                response.close()
                response = self.request("GET", remote.url, entry, stream=True)
            response.close()
        if response.status_code not in (200, 206):
            raise self.status_error(response, entry)
        hub_headers(response)
        headers = response.headers
        remote.final_url = response.url
        remote.etag = headers.get("ETag")
        remote.last_modified = headers.get("Last-Modified")
        remote.ranges = headers.get("Accept-Ranges", "").lower() == "bytes" or response.status_code == 206
        remote.content_type = headers.get("Content-Type")
        parsed = content_range(headers.get("Content-Range")) if response.status_code == 206 else None
        if parsed:
            remote.size = remote.size or parsed[2]
        elif remote.size is None and headers.get("Content-Length", "").isdigit():
            remote.size = int(headers["Content-Length"])
        disposition = filename_from_disposition(headers.get("Content-Disposition", ""))
        if entry.folder and disposition and not entry.url.startswith(("civitai://", "hf://")):
            remote.filename = disposition  # sanitised by the caller; ignored for exact dests
        response.close()
