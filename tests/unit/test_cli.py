"""`gridserve serve` / `batch`: what serve hands to `serve run`, and when a fresh local Ray is kept on loopback."""
from __future__ import annotations

import os

import pytest

from cluster import loopback as loopback_module
from deployments import cli


class Exec(Exception):
    """Raised instead of replacing the test process."""


def run_serve(monkeypatch: pytest.MonkeyPatch, ray_running: bool) -> list[str]:
    """Call `gridserve serve` with exec stubbed out; returns the argv it would exec."""
    calls: list[list[str]] = []

    def fake_exec(_: str, argv: list[str]) -> None:
        calls.append(argv)
        raise Exec

    monkeypatch.setattr(cli.os, "execvp", fake_exec)
    monkeypatch.setattr(loopback_module, "local_ray_running", lambda: ray_running)
    with pytest.raises(Exec):
        cli.main(["serve"])
    return calls[0]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Ray address and none of the variables the command sets; each is restored (or removed) afterwards."""
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_SERVE_PROXY_USE_GRPC",
                 "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"):
        monkeypatch.setenv(name, "")  # records the original state, so what the command sets cannot leak
        monkeypatch.delenv(name)


def test_fresh_local_ray_stays_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no Ray running, Serve's own Ray start is kept on 127.0.0.1; the gRPC proxy path is chosen and our
    (all-async) methods run on the replica's own event loop."""
    assert run_serve(monkeypatch, ray_running=False) == ["serve", "run", "ray_config.yaml"]
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert os.environ["RAY_SERVE_PROXY_USE_GRPC"] == "1"
    assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert os.environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "0"


def test_serve_keeps_a_users_serve_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve variables the user set win over the command's defaults."""
    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")
    run_serve(monkeypatch, ray_running=False)
    assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"


def test_serve_outside_the_repository_says_where_the_config_is(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: os.PathLike[str],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Started away from ray_config.yaml, serve says which file is missing and how to pass it (not an import error)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.os, "execvp", lambda *_: pytest.fail("serve run must not start without its config"))
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "'ray_config.yaml' not found" in err and "gridserve serve PATH/ray_config.yaml" in err


def test_existing_cluster_is_joined_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """A running cluster (or RAY_ADDRESS) is joined without changing how Ray picks its node address."""
    run_serve(monkeypatch, ray_running=True)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    run_serve(monkeypatch, ray_running=False)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


@pytest.mark.parametrize("args,running,loopback", [([], False, True), (["--address", "10.0.0.5:6379"], False, False),
                                                   (["--address=auto"], False, False), ([], True, False)])
def test_batch_keeps_only_its_own_ray_on_loopback(monkeypatch: pytest.MonkeyPatch, args: list[str], running: bool,
                                                  loopback: bool) -> None:
    """`gridserve batch` pins the Ray it starts itself to 127.0.0.1 and joins a given or running cluster as is."""
    import deployments.batch

    monkeypatch.setattr(loopback_module, "local_ray_running", lambda: running)
    monkeypatch.setattr(deployments.batch, "main", lambda argv: 0)
    assert cli.main(["batch", "--input", "in.jsonl", *args]) == 0
    assert (os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0") == loopback


def test_probe_for_a_local_ray_does_not_import_ray() -> None:
    """Ray fixes its node-address choice on import, so the probe that decides it must not import Ray."""
    import subprocess
    import sys

    code = ("import sys; from cluster.loopback import local_ray_running; local_ray_running(); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_status_png_without_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """A plain install (no `plot` extra) gets one line naming the fix, not a ModuleNotFoundError traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail as if not installed
    assert cli.main(["status", "--url", "http://127.0.0.1:9", "--png", "grid.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'gridserve[plot]'" in err[0]
