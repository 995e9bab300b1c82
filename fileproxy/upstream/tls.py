"""TLS towards https upstreams: the one client context, from the settings.

Certificates are verified against the system's trust store, or only against the CA
file ``FILEPROXY_UPSTREAM_CA`` names (a private CA), and the host name is checked, as
curl and browsers do. ``FILEPROXY_UPSTREAM_TLS_VERIFY=off`` turns both checks off
(nginx's default for ``proxy_ssl_verify``): the connection is still encrypted, but
anyone on the path can pose as the upstream.
"""

from __future__ import annotations

import ssl

from fileproxy.settings import Settings


def client_context(settings: Settings) -> ssl.SSLContext:
    """The context every https upstream connection (and ``fileproxy check``) uses."""
    context = ssl.create_default_context(cafile=settings.upstream_ca or None)
    if not settings.upstream_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def unverified_warning(settings: Settings) -> str | None:
    """The warning to log at start when https upstreams are not verified, else None."""
    if settings.upstream_tls_verify:
        return None
    if not any(spec.url.scheme == "https" for spec in settings.upstreams):
        return None
    return (
        "upstream TLS certificates are not verified (FILEPROXY_UPSTREAM_TLS_VERIFY=off): "
        "anyone on the path to the upstream can pose as it"
    )
