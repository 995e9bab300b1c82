"""The cache's pure floor: RFC 9111 rules and the eviction policy; no I/O, no clock.

- ``policy``: what a shared cache may store and reuse (RFC 9111, RFC 5861), the
  conditional request and the 304 merge, Vary, invalidation, ``Age`` and RFC 9211
  ``Cache-Status``.
- ``eviction``: byte-weighted eviction for a disk index (S3-FIFO, SIEVE, LRU).
"""
