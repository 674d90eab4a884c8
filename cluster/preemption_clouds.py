"""The three clouds' preemption notices, read from their instance metadata services over plain HTTP.

Each source keeps one `httpx.Client` that ignores proxy variables (metadata addresses are link-local and must
never go through a proxy) and answers one question per `check()`: is there a notice, and when does the node go?
"""

from __future__ import annotations

import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Callable

import httpx

from .preemption import MetadataError, Notice, deadline_until


class _HttpSource:
    name = ""
    default_base_url = ""

    def __init__(self, base_url: str, *, request_timeout_s: float = 2.0, clock: Callable[[], float] = time.time):
        self.base_url = base_url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.clock = clock
        self.http = httpx.Client(trust_env=False, timeout=request_timeout_s)

    def close(self) -> None:
        self.http.close()


class AwsSpotSource(_HttpSource):
    """EC2 Spot: IMDSv2 session token (PUT), then spot/instance-action (404 = no notice; ~2 minutes' warning)."""

    name = "aws"
    default_base_url = "http://169.254.169.254"
    TOKEN_TTL_S = 21600

    def __init__(self, base_url: str, **kw) -> None:
        super().__init__(base_url, **kw)
        self._token: str | None = None
        self._token_expires = 0.0

    def check(self, wait_s: float) -> Notice | None:
        r = self._get_action()
        if r.status_code == 401:                     # the token expired or the instance restarted: a new one
            self._token = None
            r = self._get_action()
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise MetadataError(f"spot/instance-action answered HTTP {r.status_code}")
        try:
            body = r.json()
            action, at = body["action"], body.get("time")
            when = datetime.fromisoformat(at.replace("Z", "+00:00")) if at else None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MetadataError(f"unreadable spot/instance-action {r.text[:200]!r}: {e}") from None
        return Notice(self.name, deadline_until(when, self.clock()), f"spot instance-action {action} at {at}")

    def _get_action(self) -> httpx.Response:
        return self.http.get(self.base_url + "/latest/meta-data/spot/instance-action",
                             headers={"X-aws-ec2-metadata-token": self._session_token()})

    def _session_token(self) -> str:
        now = time.monotonic()
        if self._token is None or now > self._token_expires:
            r = self.http.put(self.base_url + "/latest/api/token",
                              headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)})
            if r.status_code != 200 or not r.text:
                raise MetadataError(f"IMDSv2 token request answered HTTP {r.status_code}")
            self._token, self._token_expires = r.text.strip(), now + self.TOKEN_TTL_S - 60
        return self._token


class GcpPreemptedSource(_HttpSource):
    """GCE Spot / preemptible: instance/preempted turns TRUE 30 s before the stop. After the first answer the
    value is long-polled (wait_for_change with the last ETag), so the notice is seen the moment it flips."""

    name = "gcp"
    default_base_url = "http://metadata.google.internal"
    PATH = "/computeMetadata/v1/instance/preempted"

    def __init__(self, base_url: str, *, wait_for_change: bool = True, **kw) -> None:
        super().__init__(base_url, **kw)
        self.wait_for_change = wait_for_change
        self._etag: str | None = None

    @property
    def long_polls(self) -> bool:
        return self.wait_for_change and self._etag is not None

    def check(self, wait_s: float) -> Notice | None:
        params, timeout = {}, self.request_timeout_s
        if self.wait_for_change and self._etag:
            wait = max(1, int(wait_s))
            params = {"wait_for_change": "true", "last_etag": self._etag, "timeout_sec": str(wait)}
            timeout = wait + self.request_timeout_s
        r = self.http.get(self.base_url + self.PATH, params=params, headers={"Metadata-Flavor": "Google"},
                          timeout=timeout)
        if r.status_code != 200:
            raise MetadataError(f"instance/preempted answered HTTP {r.status_code}")
        value = r.text.strip().upper()
        if value not in ("TRUE", "FALSE"):
            raise MetadataError(f"instance/preempted answered {r.text[:40]!r}, expected TRUE or FALSE")
        self._etag = r.headers.get("ETag") or self._etag
        if value == "FALSE":
            return None
        return Notice(self.name, deadline_until(None, self.clock()), "instance/preempted is TRUE")


class AzureScheduledEventsSource(_HttpSource):
    """Azure Spot: a Scheduled Event of type Preempt naming this VM, NotBefore = when it goes (>= 30 s).
    Events for other VMs of an availability set are ignored once this VM's name is known."""

    name = "azure"
    default_base_url = "http://169.254.169.254"
    API_VERSION = "2020-07-01"
    FIRST_CALL_TIMEOUT_S = 120.0     # the first call enables the service and may take up to two minutes

    def __init__(self, base_url: str, *, vm_name: str | None = None, **kw) -> None:
        super().__init__(base_url, **kw)
        self.vm_name = vm_name
        self._enabled = False

    def check(self, wait_s: float) -> Notice | None:
        if self.vm_name is None:
            self.vm_name = self._own_name()
        r = self.http.get(self.base_url + "/metadata/scheduledevents", params={"api-version": self.API_VERSION},
                          headers={"Metadata": "true"},
                          timeout=self.request_timeout_s if self._enabled else self.FIRST_CALL_TIMEOUT_S)
        if r.status_code != 200:
            raise MetadataError(f"scheduledevents answered HTTP {r.status_code}")
        self._enabled = True
        try:
            events = [e for e in r.json().get("Events", []) if e.get("EventType") == "Preempt"]
        except (ValueError, AttributeError) as e:
            raise MetadataError(f"unreadable scheduledevents {r.text[:200]!r}: {e}") from None
        mine = [e for e in events if not self.vm_name or not e.get("Resources") or self.vm_name in e["Resources"]]
        if not mine:
            return None
        times = [_rfc1123(e.get("NotBefore")) for e in mine]
        known = [t for t in times if t is not None]
        when = min(known) if known else None
        ids = ", ".join(str(e.get("EventId", "?")) for e in mine)
        return Notice(self.name, deadline_until(when, self.clock()),
                      f"Preempt event {ids} NotBefore {when.isoformat() if when else '(none)'}")

    def _own_name(self) -> str:
        """This VM's name, to pick its own events ('' when the service does not say: then every Preempt counts)."""
        r = self.http.get(self.base_url + "/metadata/instance/compute/name",
                          params={"api-version": "2021-02-01", "format": "text"}, headers={"Metadata": "true"})
        return r.text.strip() if r.status_code == 200 else ""


def _rfc1123(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None


CLOUD_SOURCES = {"aws": AwsSpotSource, "gcp": GcpPreemptedSource, "azure": AzureScheduledEventsSource}
