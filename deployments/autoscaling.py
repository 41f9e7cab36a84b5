"""A Serve autoscaling policy that scales on LLM work (pending tokens, KV-cache use), not request count.

Ongoing-request count is a poor load signal for LLMs: ten 2-token answers and ten 2,000-token answers count the
same. Each replica reports its pending tokens (prompt tokens not yet prefilled plus tokens still to generate) and
its KV-cache block usage through `record_autoscaling_stats`; this policy sizes the deployment from those.
"""
from __future__ import annotations

import math
from typing import Any


class TokenLoadPolicy:
    """Desired replicas = the largest of the token, KV-cache and (fallback) request-count estimates."""

    def __init__(self, target_pending_tokens: float = 8192, target_kv_usage: float = 0.7) -> None:
        if target_pending_tokens <= 0 or not 0 < target_kv_usage <= 1:
            raise ValueError("TokenLoadPolicy: target_pending_tokens must be > 0 and target_kv_usage in (0, 1]")
        self.target_pending_tokens = target_pending_tokens
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """Serve calls this each control-loop tick; delays and min/max bounds are applied by Serve after it."""
        metrics = ctx.aggregated_metrics or {}
        pending = sum(metrics.get("pending_tokens", {}).values())
        kv = sum(metrics.get("kv_cache_usage", {}).values())
        requests = ctx.total_num_requests / max(getattr(ctx.config, "target_ongoing_requests", None) or 1e9, 1e-9)
        desired = max(math.ceil(pending / self.target_pending_tokens), math.ceil(kv / self.target_kv_usage),
                      math.ceil(requests), 1 if ctx.current_num_replicas else 0)
        state = dict(ctx.policy_state)
        state["gridserve_last_estimate"] = {"pending_tokens": pending, "kv_usage_sum": kv, "desired": desired}
        return desired, state
