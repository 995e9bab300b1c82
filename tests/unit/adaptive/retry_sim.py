"""Tries per request when every replica fails, through the proxy's retry rule (test helper).

One request at a time (``concurrency`` 1), or a few at once, to ``replicas`` replicas that
all answer 503, with FILEPROXY_RETRIES further tries: each try asks ``RetryBudget.start``
as ``proxy_handler._retry_to`` does (in-flight requests as the active count) after the
failure was fed to the throttle, as ``ReplicaSet.failed`` does. A healthy phase can
follow: how soon are retries back?

``python -m tests.unit.adaptive.retry_sim`` prints the figures quoted in
``fileproxy/adaptive/retry_budget.py``: budget alone (before) and budget + throttle.
"""

from __future__ import annotations

from dataclasses import dataclass

from fileproxy.adaptive.retry_budget import RetryBudget, RetryThrottle


@dataclass(frozen=True)
class OutageFigures:
    requests: int
    tries: int

    @property
    def per_request(self) -> float:
        return self.tries / self.requests


def outage(
    budget: RetryBudget, requests: int = 90, replicas: int = 3, retries: int = 2,
    concurrency: int = 1,
) -> OutageFigures:  # fmt: skip
    """``requests`` GETs, ``concurrency`` at a time (in lock step), every try a 503."""
    tries = 0
    done = 0
    while done < requests:
        batch = min(concurrency, requests - done)
        # each request of the batch: its first try, then retries while allowed
        for _ in range(batch):
            tried = 1
            tries += 1
            budget.failed_try()
            while tried < min(replicas, retries + 1) and budget.start(batch):
                tries += 1
                tried += 1
                budget.failed_try()
                budget.finish()
        done += batch
    return OutageFigures(requests, tries)


def budget_alone() -> RetryBudget:
    """Before issue 20: the concurrency budget only (no throttle)."""
    return RetryBudget(20.0, 3, RetryThrottle(max_tokens=0))


def main() -> None:
    for replicas in (2, 3):
        before = outage(budget_alone(), replicas=replicas)
        after = outage(RetryBudget(), replicas=replicas)
        print(
            f"{replicas} replicas all 503, 90 GETs one at a time: budget alone "
            f"{before.tries} tries ({before.per_request:.2f}/GET); with the throttle "
            f"{after.tries} ({after.per_request:.2f}/GET)"
        )


if __name__ == "__main__":
    main()
