"""TokenLoadPolicy sizes the deployment from replica-reported tokens and KV usage."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.autoscaling import TokenLoadPolicy


def ctx(pending: dict, kv: dict, requests: float = 0, replicas: int = 1, target: float = 1e9) -> SimpleNamespace:
    """A stand-in for Serve's AutoscalingContext with just the fields the policy reads."""
    return SimpleNamespace(aggregated_metrics={"pending_tokens": pending, "kv_cache_usage": kv},
                           total_num_requests=requests, current_num_replicas=replicas, policy_state={},
                           config=SimpleNamespace(target_ongoing_requests=target))


def test_long_generations_scale_up_where_request_count_would_not() -> None:
    """4 requests with 20k pending tokens -> 3 replicas at 8192 tokens each, though 4 requests look idle."""
    desired, state = TokenLoadPolicy(8192, 0.7)(ctx({"r1": 20000.0}, {"r1": 0.3}, requests=4, target=16))
    assert desired == 3 and state["gridserve_last_estimate"]["pending_tokens"] == 20000


def test_kv_pressure_scales_up_and_idle_scales_to_one() -> None:
    """Two replicas at 90% KV use want 3; an idle deployment wants 1 (never 0 while it has replicas)."""
    assert TokenLoadPolicy(8192, 0.7)(ctx({"a": 0.0, "b": 0.0}, {"a": 0.9, "b": 0.9}, replicas=2))[0] == 3
    assert TokenLoadPolicy()(ctx({"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.0}, replicas=2))[0] == 1


def test_bad_targets_are_refused() -> None:
    """Targets outside their ranges raise ValueError naming them."""
    with pytest.raises(ValueError, match="target_kv_usage"):
        TokenLoadPolicy(target_kv_usage=1.5)
