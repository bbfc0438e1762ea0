"""``GET /metrics``: the control plane's Prometheus metrics, for a METRICS_TOKEN bearer or a METRICS_ALLOW network.

A scrape serves the process-kept metrics (``app.system.instruments``: added up over every gunicorn worker in
multiprocess mode) and the database's (``app.system.gauges``). docs/OPERATIONS.md lists every metric.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.api import document
from app.config import ConfigError
from app.errors import Forbidden, Unauthorized
from app.system import instruments
from app.system.gauges import Families, database_metrics

bp = Blueprint("metrics", __name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NETWORKS_KEY = "metrics_networks"
MIN_TOKEN_LENGTH = 16
NEEDS_TOKEN = "/metrics needs 'Authorization: Bearer <METRICS_TOKEN>' from this address"  # noqa: S105 - a message
WRONG_TOKEN = "the bearer token is not METRICS_TOKEN"  # noqa: S105 - a message, not a secret
NOT_ALLOWED = "/metrics is served only to the networks of METRICS_ALLOW (set METRICS_TOKEN to scrape from elsewhere)"
SHORT_TOKEN = f"METRICS_TOKEN must be at least {MIN_TOKEN_LENGTH} characters long"
BAD_NETWORK = "METRICS_ALLOW must be comma-separated networks such as 10.0.0.0/8, or 'none': {error}"
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def parse_networks(value: str) -> list[Network]:
    """Parse METRICS_ALLOW: comma-separated addresses or networks (CIDR), or ``none``."""
    if value.strip().lower() == "none":
        return []
    try:
        return [ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(BAD_NETWORK.format(error=exc)) from None


def _from_allowed_network(networks: list[Network]) -> bool:
    """Tell whether the caller's address is allowed; never for a request relayed by a proxy (it has the proxy's)."""
    if any(header in request.headers for header in PROXY_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def check_access() -> None:
    """Let the METRICS_TOKEN bearer in from anywhere and any caller from a METRICS_ALLOW network; refuse the rest."""
    token = current_app.config["METRICS_TOKEN"]
    header = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
        return
    if _from_allowed_network(current_app.extensions[NETWORKS_KEY]):
        return
    if token:
        challenge = {"WWW-Authenticate": 'Bearer realm="metrics"'}
        if header:
            raise Unauthorized(WRONG_TOKEN, headers=challenge)
        raise Unauthorized(NEEDS_TOKEN, code="missing_token", headers=challenge)
    raise Forbidden(NOT_ALLOWED)


class _Process(Collector):
    """Serve this process's own values (when not in multiprocess mode)."""

    def collect(self) -> Iterator[Metric]:
        """Yield the process registry's metrics."""
        yield from instruments.PROCESS.collect()


def render(accept: str = "") -> tuple[bytes, str]:
    """Return every metric, and its content type: Prometheus's text format, or OpenMetrics if ``accept`` asks."""
    registry = CollectorRegistry(auto_describe=False)
    if instruments.multiprocess():
        MultiProcessCollector(registry)
    else:
        registry.register(_Process())
    info = GaugeMetricFamily("automation_build_info", "The control plane's version", labels=["version"])
    info.add_metric([str(current_app.config["VERSION"])], 1)
    families = database_metrics(offline_after=int(current_app.config["AGENT_OFFLINE_AFTER"]))
    registry.register(Families([info, *families]))
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type


@bp.get("/metrics")
@document(
    "Prometheus metrics, text format (a METRICS_TOKEN bearer, or a METRICS_ALLOW network: loopback by default)",
    responses={200: None},
    errors={401: ("missing_token", "invalid_token"), 403: ("access_denied",)},
    public=True,
)
def metrics() -> Response:
    """Serve the metrics."""
    check_access()
    body, content_type = render(request.headers.get("Accept", ""))
    return Response(body, headers={"Content-Type": content_type})


def init_metrics(app: Flask) -> None:
    """Check the metrics settings, count every request, observe job run times, and serve ``/metrics``."""
    token = app.config["METRICS_TOKEN"]
    if token and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(SHORT_TOKEN)
    app.extensions[NETWORKS_KEY] = parse_networks(app.config["METRICS_ALLOW"])
    disable_created_metrics()  # no *_created series: the same output in single- and multiprocess mode
    instruments.install_request_hooks(app)
    instruments.install_session_hooks()
    app.register_blueprint(bp)
