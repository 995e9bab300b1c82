"""Shared state: the store (embedded or Redis), a worker's link to it, the per-upstream
adaptation around the brains, the background sync and the fleet's view."""
