"""HTTP semantics of the proxy, end to end: the real daemon between a client and a backend.

Each test starts ``fileproxy serve`` as a subprocess in front of either an aiohttp app
written here (running in the test's own loop) or the bundled sample upstream, and checks
one behaviour from the client's side and, where it matters, from the backend's side.
Requests the aiohttp client would refuse or normalise are written on a raw socket.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import yarl
from aiohttp import web

from tests.conftest import file_bytes_sha256 if False else None  # noqa: F401  (placeholder)
