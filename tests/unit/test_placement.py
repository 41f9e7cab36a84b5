"""Placement layouts without Ray: one bundle per stage (a TP group never straddles nodes), checks against nodes."""
from __future__ import annotations

import pytest

from cluster.config import GridServeConfig
from cluster.placement import Layout, NodeInfo, plan_layout, serve_bundles


def cfg(model_dirs: dict, tp: int, pp: int, **extra: object) -> GridServeConfig:
    """A config of the small Llama with the given grid."""
    return GridServeConfig(model=str(model_dirs["llama_gqa"]), tensor_parallel_size=tp, pipeline_parallel_size=pp,
                           max_model_len=128, max_num_batched_tokens=256, **extra)


def nodes(*gpus: float) -> list[NodeInfo]:
    """Nodes with the given GPU counts."""
    return [NodeInfo(f"node{i:02d}-xxxxxxxx", f"10.0.0.{i}", g) for i, g in enumerate(gpus)]


def test_one_bundle_per_stage_holds_the_whole_tp_group(model_dirs: dict) -> None:
    """tp=2 pp=2 on GPUs: two bundles of 2 GPUs; worker (stage, rank) goes to bundle `stage`; Serve adds one."""
    layout = plan_layout(cfg(model_dirs, 2, 2, replica_cpus=0.5), nodes(2, 2), "GPU")
    assert layout.bundles == [{"GPU": 2.0}, {"GPU": 2.0}]
    assert [layout.bundle_index(s, r) for s in range(2) for r in range(2)] == [0, 0, 1, 1]
    assert layout.worker_options() == {"num_gpus": 1, "num_cpus": 0}
    assert serve_bundles(cfg(model_dirs, 2, 2, replica_cpus=0.5), layout) == [{"CPU": 0.5}, {"GPU": 2.0},
                                                                                {"GPU": 2.0}]


def test_cpu_bundles_and_tp_across_nodes(model_dirs: dict) -> None:
    """CPU workers ask for cpus_per_worker each; allow_tp_across_nodes gives one bundle per worker."""
    cpu = Layout.of(cfg(model_dirs, 2, 1, cpus_per_worker=0.5), "CPU")
    assert cpu.bundles == [{"CPU": 1.0}] and cpu.worker_options({}) == {
        "num_cpus": 0.5, "runtime_env": {"env_vars": {"GOMP_SPINCOUNT": "10000"}}}
    assert cpu.worker_options({"GOMP_SPINCOUNT": "300000"}) == {"num_cpus": 0.5}  # the user's choice stands
    spread = plan_layout(cfg(model_dirs, 4, 1, allow_tp_across_nodes=True), nodes(2, 2), "GPU")
    assert spread.bundles == [{"GPU": 1.0}] * 4 and [spread.bundle_index(0, r) for r in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("tp,pp,gpus,message", [
    (4, 1, (2, 2), r"tensor_parallel_size=4 needs 4 GPU on one node but the largest node has 2"),
    (1, 4, (2, 1), r"needs 4 GPU .* cluster has 3 GPU in total"),
    (2, 2, (3, 1), r"the nodes hold 1 TP groups of 2 GPU but pipeline_parallel_size=2 needs 2")])
def test_layouts_the_cluster_can_never_hold_are_refused(model_dirs: dict, tp: int, pp: int, gpus: tuple,
                                                        message: str) -> None:
    """Each impossible grid fails at once, naming the sizes and what to change."""
    with pytest.raises(ValueError, match=message):
        plan_layout(cfg(model_dirs, tp, pp), nodes(*gpus), "GPU")


@pytest.mark.parametrize(("resource", "workers", "cpus", "cores", "on"), [
    ("GPU", 8, 1.5, 2, True),  # the step runs on the GPUs: the engine's work never slows it
    ("CPU", 1, 1.5, 2, False),  # the shipped 2-core box: the worker's 2 threads fill it
    ("CPU", 1, 0.5, 2, True),  # 1 thread leaves a core
    ("CPU", 2, 1.0, 4, True),
    ("CPU", 2, 2.0, 4, False),
])
def test_async_scheduling_default_follows_spare_cores(monkeypatch: pytest.MonkeyPatch, resource: str, workers: int,
                                                      cpus: float, cores: int, on: bool) -> None:
    """Overlapping the engine with a step is the default where it takes no core from the step."""
    from cluster import placement

    monkeypatch.setattr(placement.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert placement.overlap_spares_the_step(resource, workers, cpus) is on


@pytest.mark.parametrize("setting", [True, False, None])
def test_async_scheduling_setting_wins_over_the_default(monkeypatch: pytest.MonkeyPatch, model_dirs: dict,
                                                        setting: bool | None) -> None:
    """true/false force async scheduling; unset, 2 threads on a 2-core node leave no core, so it is off."""
    from cluster import placement

    monkeypatch.setattr(placement.os, "sched_getaffinity", lambda pid: {0, 1})
    c = cfg(model_dirs, 1, 1, async_scheduling=setting, cpus_per_worker=1.5)
    assert placement.async_scheduling_on(c, "CPU", 1) is bool(setting)
