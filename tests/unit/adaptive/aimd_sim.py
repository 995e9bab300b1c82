"""Fake upstream + Gcra + AimdLimiter under a fake clock (test helper).

The upstream serves ``capacity`` requests per window and fails the excess, so a
window's error rate is ``max(0, (admitted - capacity) / admitted)``. Requests are
offered evenly at ``offered`` req/s and admitted through a ``Gcra`` paced at the
limiter's current limit; ``decide`` runs at every window's end and the Gcra follows.

``python -m tests.unit.adaptive.aimd_sim [--sweep]`` prints the growth-rule comparison
quoted in ``fileproxy/adaptive/aimd_limiter.py``, then the idle recovery after an outage
(no traffic at all) and one heavy client against light ones through ``FairShare``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace

from fileproxy.adaptive.aimd_limiter import AimdLimiter, Decision, Growth, LimiterConfig, Outcome
from fileproxy.adaptive.fair_share import FairShare, spare_burst
from fileproxy.adaptive.gcra import Gcra

GCRA_BURST = 10


@dataclass(frozen=True)
class Phase:
    windows: int
    capacity: float
    offered: float = 2000.0


@dataclass(frozen=True)
class WindowResult:
    index: int
    limit: float  # the rate admission ran at during the window
    admitted: int
    errors: int
    new_limit: float
    decision: Decision | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.admitted if self.admitted else 0.0


@dataclass
class UpstreamSim:
    config: LimiterConfig = field(default_factory=LimiterConfig)
    now: float = 0.0
    results: list[WindowResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.limiter = AimdLimiter(self.config)
        self.gcra = Gcra(self.limiter.limit, GCRA_BURST)
        self.limiter.decide(self.now)  # opens the first window

    def run(self, *phases: Phase) -> list[WindowResult]:
        """Run the phases; returns the results of these windows only."""
        first = len(self.results)
        window = self.config.window_s
        for phase in phases:
            arrivals = round(phase.offered * window)
            capacity = int(phase.capacity * window)
            for _ in range(phase.windows):
                start, limit = self.now, self.limiter.limit
                admitted = errors = 0
                for i in range(arrivals):
                    t = start + (i + 0.5) * window / arrivals
                    if not self.gcra.try_admit(t)[0]:
                        continue
                    admitted += 1
                    failed = admitted > capacity
                    errors += failed
                    self.limiter.record(t, Outcome.ERROR if failed else Outcome.SUCCESS)
                self.now = start + window
                decision = self.limiter.decide(self.now)
                self.gcra.set_rate(self.limiter.limit)
                self.results.append(
                    WindowResult(
                        len(self.results),
                        limit,
                        admitted,
                        errors,
                        self.limiter.limit,
                        decision,
                    )
                )
        return self.results[first:]


def windows_until(results: list[WindowResult], predicate_limit: float, above: bool) -> int | None:
    """1-based count of windows until the limit after a window crosses the bound."""
    for n, r in enumerate(results, start=1):
        if (r.new_limit >= predicate_limit) if above else (r.new_limit <= predicate_limit):
            return n
    return None


@dataclass(frozen=True)
class GrowthFigures:
    growth: Growth
    outage_recovery: int | None  # windows from the end of an outage to >= 640 (cap 800)
    drop_recovery: int | None  # windows from settled at capacity 100 to >= 640 (cap 800)
    overload_low: float  # capacity 300, offered 2000: limit range after settling
    overload_high: float
    overload_mean_error: float
    light_max: float  # 60 s of 50 req/s offered, capacity 800
    sweep_low: float  # capacities 150..950: the lowest and highest limit / capacity
    sweep_high: float
    sweep_worst_error: float  # ... and the worst mean error, after settling


def growth_figures(growth: Growth, sweep: bool = False) -> GrowthFigures:
    base = replace(LimiterConfig(), growth=growth)
    outage = UpstreamSim(replace(base, initial=1000.0))
    outage.run(Phase(10, 0.0))
    outage_recovery = windows_until(outage.run(Phase(60, 800.0)), 640.0, above=True)
    drop = UpstreamSim(base)
    drop.run(Phase(30, 100.0))
    drop_recovery = windows_until(drop.run(Phase(60, 800.0)), 640.0, above=True)
    steady = UpstreamSim(base).run(Phase(150, 300.0))[30:]
    light = UpstreamSim(base).run(Phase(60, 800.0, offered=50.0))
    ratios: list[float] = []
    errors: list[float] = []
    for capacity in range(150, 951, 25) if sweep else ():
        settled = UpstreamSim(base).run(Phase(120, float(capacity)))[40:]
        ratios += [r.limit / capacity for r in settled]
        errors.append(sum(r.error_rate for r in settled) / len(settled))
    return GrowthFigures(
        growth,
        outage_recovery,
        drop_recovery,
        min(r.limit for r in steady),
        max(r.limit for r in steady),
        sum(r.error_rate for r in steady) / len(steady),
        max(r.new_limit for r in light),
        min(ratios, default=math.nan),
        max(ratios, default=math.nan),
        max(errors, default=math.nan),
    )


CANDIDATES = (
    Growth(factor=1.05, step=1.0),
    Growth(factor=1.1, step=1.0),
    Growth(factor=1.1, step=5.0),
    Growth(factor=1.15, step=5.0),
    Growth(factor=1.2, step=1.0),
    Growth(factor=1.2, step=5.0),
    Growth(factor=1.25, step=1.0),
    Growth(factor=1.3, step=1.0),
)


@dataclass(frozen=True)
class IdleFigures:
    cut_to: float  # the limit after 10 windows of total outage from 1000
    to_80_percent: int | None  # silent windows until the limit is >= 0.8 x max_limit
    to_max: int | None  # ... until it is back at max_limit (enforcement ends there)


def idle_figures(config: LimiterConfig | None = None) -> IdleFigures:
    """An outage takes the limit down, then no traffic at all: how soon is the cut gone?"""
    cfg = replace(config or LimiterConfig(), initial=1000.0)
    sim = UpstreamSim(cfg)
    cut_to = sim.run(Phase(10, 0.0))[-1].new_limit
    quiet = sim.run(Phase(60, 0.0, offered=0.0))
    return IdleFigures(
        cut_to,
        windows_until(quiet, 0.8 * cfg.max_limit, above=True),
        windows_until(quiet, cfg.max_limit, above=True),
    )


@dataclass(frozen=True)
class FairFigures:
    settled_limit: tuple[float, float]  # limit range over the last 60 windows
    mean_error: float  # upstream error rate over them
    light_admitted: float  # fraction of the light clients' requests admitted
    heavy_admitted: float  # the heavy client's admitted req/s


def fair_share_figures(
    capacity: float = 300.0, heavy: float = 2000.0, lights: int = 4, light: float = 20.0
) -> FairFigures:
    """One heavy client (``heavy`` req/s) and ``lights`` light ones (``light`` req/s each)
    through ``FairShare`` + one ``Gcra`` at the AIMD limit, upstream of ``capacity``.

    The window's upstream fails the admitted excess over capacity (whoever sent it).
    """
    cfg = LimiterConfig()
    limiter, fair = AimdLimiter(cfg), FairShare()
    gcra = Gcra(limiter.limit, GCRA_BURST)
    now = 0.0
    limiter.decide(now)
    streams = [("heavy", heavy)] + [(f"light{i}", light) for i in range(lights)]
    arrivals = sorted(
        ((i + 0.5 + 0.1 * k) / rate, name)
        for k, (name, rate) in enumerate(streams)
        for i in range(round(rate))
    )
    limits: list[float] = []
    errors_rates: list[float] = []
    light_offered = light_ok = heavy_ok = 0
    windows = 120
    for w in range(windows):
        admitted = errors = 0
        for offset, name in arrivals:
            t = now + offset
            within = fair.within_share(t, name, limiter.limit, GCRA_BURST)
            ok = gcra.try_admit(t, None if within else spare_burst(GCRA_BURST))[0]
            if within and not ok:
                fair.refund(name)
            if w >= windows - 60:
                if name == "heavy":
                    heavy_ok += ok
                else:
                    light_offered += 1
                    light_ok += ok
            if not ok:
                continue
            admitted += 1
            failed = admitted > capacity
            errors += failed
            limiter.record(t, Outcome.ERROR if failed else Outcome.SUCCESS)
        if w >= windows - 60:
            limits.append(limiter.limit)
            errors_rates.append(errors / admitted if admitted else 0.0)
        now += 1.0
        limiter.decide(now)
        gcra.set_rate(limiter.limit)
    return FairFigures(
        (min(limits), max(limits)),
        sum(errors_rates) / len(errors_rates),
        light_ok / light_offered,
        heavy_ok / 60,
    )


def main(sweep: bool = False) -> None:
    print(
        "growth          outage->640  100->640  cap 300: limit  mean err  light max"
        "  sweep: limit/cap  worst err"
    )
    for growth in CANDIDATES:
        f = growth_figures(growth, sweep)
        print(
            f"x{growth.factor:<4} >= +{growth.step:<4} {f.outage_recovery!s:>9}  "
            f"{f.drop_recovery!s:>8}  {f.overload_low:6.0f}..{f.overload_high:<6.0f}"
            f"  {f.overload_mean_error:7.1%}  {f.light_max:8.1f}"
            f"  {f.sweep_low:6.2f}..{f.sweep_high:<6.2f}  {f.sweep_worst_error:8.1%}"
        )

    idle = idle_figures()
    print(
        f"\nidle: outage from 1000 cut to {idle.cut_to:g}; without traffic back to 0.8 x max "
        f"in {idle.to_80_percent} windows, to max in {idle.to_max}"
    )
    fair = fair_share_figures()
    print(
        f"fair share (capacity 300; heavy 2000 req/s, 4 light x 20 req/s): limit "
        f"{fair.settled_limit[0]:.0f}..{fair.settled_limit[1]:.0f}, mean err "
        f"{fair.mean_error:.1%}, light admitted {fair.light_admitted:.1%}, heavy "
        f"{fair.heavy_admitted:.0f} req/s"
    )


if __name__ == "__main__":
    main(sweep="--sweep" in sys.argv)  # --sweep adds capacities 150..950 (about a minute)
