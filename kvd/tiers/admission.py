"""Cost-aware admission: a block in a slow tier is a hit only if loading it beats recomputing it.

Each tier's latency (a round trip: an index or STRLEN query) and read bandwidth (bytes over the whole duration of a
get, so per-read overheads are in it) are exponentially weighted moving averages of what the daemon measured on its
own operations. A run of `n` blocks of `b` bytes in a tier costs `latency + n*b/bandwidth`; recomputing them costs
`n * tokens_per_block * recompute_us_per_token`. L1 hits are always hits.

Until a tier has been measured, or when its last measurement is older than `stale_after_s` (a tier that is never
admitted is never read, so its estimate would never improve), the optimistic prior is used: the next hit is
reported and the read that follows measures the tier again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvd.types import Tier


@dataclass(frozen=True, slots=True)
class TierEstimate:
    latency_s: float
    bandwidth_bps: float

    def load_seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bps


# Optimistic priors (a local NVMe drive, a store on a fast LAN): the first reads measure the real thing.
PRIORS: dict[Tier, TierEstimate] = {
    Tier.DISK: TierEstimate(latency_s=100e-6, bandwidth_bps=2e9),
    Tier.REMOTE: TierEstimate(latency_s=500e-6, bandwidth_bps=1e9),
}
_DEFAULT_PRIOR = TierEstimate(latency_s=1e-3, bandwidth_bps=1e9)
# Reads smaller than this say little about bandwidth (latency dominates them).
MIN_BANDWIDTH_SAMPLE_BYTES = 256 << 10


class TierCost:
    """EWMAs of one tier's latency and bandwidth."""

    def __init__(self, prior: TierEstimate, alpha: float = 0.2, stale_after_s: float = 60.0) -> None:
        self.prior = prior
        self.alpha = alpha
        self.stale_after_s = stale_after_s
        self.latency_s: float | None = None
        self.bandwidth_bps: float | None = None
        self.samples = 0
        self._last_read = 0.0

    def observe_latency(self, seconds: float) -> None:
        self.latency_s = seconds if self.latency_s is None else _ewma(self.latency_s, seconds, self.alpha)

    def observe_read(self, nbytes: int, seconds: float) -> None:
        if nbytes < MIN_BANDWIDTH_SAMPLE_BYTES or seconds <= 0:
            return
        rate = nbytes / seconds
        self.bandwidth_bps = rate if self.bandwidth_bps is None else _ewma(self.bandwidth_bps, rate, self.alpha)
        self.samples += 1
        self._last_read = time.monotonic()

    def estimate(self) -> TierEstimate:
        if self.bandwidth_bps is None or time.monotonic() - self._last_read > self.stale_after_s:
            return TierEstimate(
                latency_s=self.prior.latency_s if self.latency_s is None else self.latency_s,
                bandwidth_bps=self.prior.bandwidth_bps,
            )
        return TierEstimate(
            latency_s=self.prior.latency_s if self.latency_s is None else self.latency_s,
            bandwidth_bps=self.bandwidth_bps,
        )


class CostModel:
    def __init__(self, recompute_us_per_token: float, tokens_per_block: int, stale_after_s: float = 60.0) -> None:
        self.recompute_s_per_block = recompute_us_per_token * tokens_per_block / 1e6
        self.stale_after_s = stale_after_s
        self.tiers: dict[Tier, TierCost] = {}
        self.rejected_blocks = 0

    def tier(self, kind: Tier) -> TierCost:
        cost = self.tiers.get(kind)
        if cost is None:
            cost = self.tiers[kind] = TierCost(PRIORS.get(kind, _DEFAULT_PRIOR), stale_after_s=self.stale_after_s)
        return cost

    def worth_loading(self, kind: Tier, blocks: int, block_bytes: int) -> bool:
        """Whether loading `blocks` blocks of `block_bytes` from `kind` is estimated faster than recomputing them."""
        if kind is Tier.HOST_MEMORY:
            return True
        estimate = self.tier(kind).estimate()
        return estimate.load_seconds(blocks * block_bytes) < blocks * self.recompute_s_per_block

    def describe(self) -> dict[str, float]:
        """Current estimates, for stats and the bench."""
        out: dict[str, float] = {}
        for kind, cost in self.tiers.items():
            estimate = cost.estimate()
            name = kind.name.lower()
            out[f"tier_{name}_latency_us"] = round(estimate.latency_s * 1e6, 1)
            out[f"tier_{name}_read_mbps"] = round(estimate.bandwidth_bps / 1e6, 1)
        return out


def _ewma(old: float, new: float, alpha: float) -> float:
    return old + alpha * (new - old)
