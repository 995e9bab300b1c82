"""Operations: /health, /ready, /stats, /metrics, log configuration and `fileproxy check`."""
