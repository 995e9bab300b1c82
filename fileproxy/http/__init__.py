"""The client-facing edge and the proxy path: protocol, gate, handler, headers, errors."""
