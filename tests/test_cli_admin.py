"""The admin CLI (`gateway status|switch|rollback|canary|shadow|rollout|load|unload`) against a real server.

One server serves the whole module (a copy of the repository with an extra, never-aliased version 3,
and the readiness gate off: these tests are about the commands, not release approval), so every test
leaves the aliases as it found them and never assumes which version is stable.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli import main
from tests.conftest import MODEL, RunningServer, free_port, good_row
from tests.conftest import MODELS as BUNDLED_MODELS

pytestmark = pytest.mark.e2e

VIEWER = "cli-viewer-token-0123456789"
OPERATOR = "cli-operator-token-0123456789"
ADMIN = "cli-admin-token-0123456789"
ENV = {"GATEWAY_ADMIN_TOKENS": json.dumps([
    {"name": "viv", "role": "viewer", "token": VIEWER},
    {"name": "opal", "role": "operator", "token": OPERATOR},
    {"name": "adam", "role": "admin", "token": ADMIN},
])}


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory, ungated_policies: Path) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("cli-repo")
    models = root / "models"
    shutil.copytree(BUNDLED_MODELS, models, ignore=shutil.ignore_patterns("data", "*.py", "__pycache__"))
    shutil.copytree(models / MODEL / "2", models / MODEL / "3")
    card = models / MODEL / "3" / "model.yaml"
    card.write_text(card.read_text().replace("version: '2'", "version: '3'"))
    running = RunningServer(models, ungated_policies, ENV, root / "state")
    try:
        running.wait_live()
        yield running
    finally:
        running.stop()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads GATEWAY_URL and GATEWAY_TOKEN; tests set them only on purpose."""
    monkeypatch.delenv("GATEWAY_URL", raising=False)
    monkeypatch.delenv("GATEWAY_TOKEN", raising=False)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """Run the CLI; (exit code, stdout as JSON when it is JSON, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    try:
        body = json.loads(out) if out.strip() else None
    except ValueError:
        body = out
    return code, body, err


def admin(cli_server: RunningServer, *argv: str, token: str = OPERATOR) -> list[str]:
    return [*argv, "--url", cli_server.url, "--token", token]


def view(cli_server: RunningServer) -> dict[str, Any]:
    answer = httpx.get(f"{cli_server.url}/admin/models/{MODEL}", headers={"Authorization": f"Bearer {VIEWER}"})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def stable_and_other(cli_server: RunningServer) -> tuple[str, str]:
    stable = view(cli_server)["aliases"]["stable"]
    return stable, "2" if stable == "1" else "1"


def unversioned_version(cli_server: RunningServer) -> str:
    answer = httpx.post(f"{cli_server.url}/v1/models/{MODEL}:predict", json={"instances": [good_row()]})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-model-version"]


def last_event(cli_server: RunningServer) -> dict[str, Any]:
    answer = httpx.get(f"{cli_server.url}/admin/events", headers={"Authorization": f"Bearer {VIEWER}"})
    event: dict[str, Any] = answer.json()["events"][-1]
    return event


# ---------------------------------------------------------------- commands that work


def test_status(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, body, _ = cli(capsys, "status", "--url", cli_server.url)
    assert code == 0
    (model,) = body["models"]
    assert model["name"] == MODEL and model["aliases"]["stable"] == view(cli_server)["aliases"]["stable"]
    assert {v["version"] for v in model["versions"]} == {"1", "2", "3"}


def test_switch_and_switch_back(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    stable, other = stable_and_other(cli_server)
    code, body, _ = cli(capsys, *admin(cli_server, "switch", MODEL, other))
    assert code == 0
    assert body["action"] == "switch" and body["before"]["stable"] == stable and body["after"]["stable"] == other
    assert unversioned_version(cli_server) == other
    assert last_event(cli_server)["actor"] == "opal"
    code, body, _ = cli(capsys, *admin(cli_server, "switch", MODEL, stable))
    assert code == 0 and unversioned_version(cli_server) == stable


def test_rollback(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    stable, other = stable_and_other(cli_server)
    assert cli(capsys, *admin(cli_server, "switch", MODEL, other))[0] == 0
    code, body, _ = cli(capsys, *admin(cli_server, "rollback", MODEL, "--reason", "cli drill"))
    assert code == 0
    assert body["action"] == "rollback" and body["after"]["stable"] == stable
    assert unversioned_version(cli_server) == stable
    assert last_event(cli_server)["reason"] == "cli drill"


def test_force_is_sent_only_when_asked_for_and_needs_an_admin(cli_server: RunningServer,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    stable, other = stable_and_other(cli_server)
    code, body, _ = cli(capsys, *admin(cli_server, "switch", MODEL, other, "--force"))
    assert code == 1 and "needs the admin role" in body["error"]
    code, body, _ = cli(capsys, *admin(cli_server, "rollout", "start", MODEL, other, "--force"))
    assert code == 1 and "needs the admin role" in body["error"]
    assert view(cli_server)["aliases"]["stable"] == stable and view(cli_server)["rollout"] is None
    code, body, _ = cli(capsys, *admin(cli_server, "switch", MODEL, other, "--force", token=ADMIN))
    assert code == 0 and body["after"]["stable"] == other and last_event(cli_server)["actor"] == "adam"
    assert cli(capsys, *admin(cli_server, "switch", MODEL, stable))[0] == 0


def test_canary_set_and_clear(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    _, other = stable_and_other(cli_server)
    code, body, _ = cli(capsys, *admin(cli_server, "canary", MODEL, other, "25"))
    assert code == 0 and body["after"]["canary"] == other and body["after"]["canary_percent"] == 25
    assert view(cli_server)["aliases"]["canary"] == other
    code, body, _ = cli(capsys, *admin(cli_server, "canary", MODEL, "--clear"))
    assert code == 0 and body["after"]["canary"] is None
    assert view(cli_server)["aliases"]["canary"] is None
    # a percentage of 0 also clears it
    assert cli(capsys, *admin(cli_server, "canary", MODEL, other, "100"))[0] == 0
    assert unversioned_version(cli_server) == other
    code, body, _ = cli(capsys, *admin(cli_server, "canary", MODEL, other, "0"))
    assert code == 0 and body["after"]["canary"] is None and view(cli_server)["aliases"]["canary"] is None


def test_canary_refusals(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    stable, other = stable_and_other(cli_server)
    code, body, _ = cli(capsys, *admin(cli_server, "canary", MODEL, other, "150"))
    assert code == 1 and "percent" in json.dumps(body)
    code, body, _ = cli(capsys, *admin(cli_server, "canary", MODEL, stable, "10"))
    assert code == 1 and "stable" in body["error"]
    assert view(cli_server)["aliases"]["canary"] is None


def test_shadow_set_and_clear(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, body, _ = cli(capsys, *admin(cli_server, "shadow", MODEL, "3", "--percent", "50"))
    assert code == 0 and body["after"]["shadow"] == "3" and body["after"]["shadow_percent"] == 50
    assert view(cli_server)["shadow"]["version"] == "3"
    code, body, _ = cli(capsys, *admin(cli_server, "shadow", MODEL, "--clear"))
    assert code == 0 and body["after"]["shadow"] is None
    assert view(cli_server)["aliases"]["shadow"] is None
    code, body, _ = cli(capsys, *admin(cli_server, "shadow", MODEL, "3"))  # default: mirror everything
    assert code == 0 and body["after"]["shadow_percent"] == 100
    assert cli(capsys, *admin(cli_server, "shadow", MODEL, "--clear"))[0] == 0


def test_unload_and_load_a_version(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, body, _ = cli(capsys, *admin(cli_server, "unload", MODEL, "--version", "3", token=ADMIN))
    assert code == 0 and "3" not in body["after"]["serving"]
    assert "3" not in view(cli_server)["serving"]
    code, body, _ = cli(capsys, *admin(cli_server, "load", MODEL, "--version", "3", token=ADMIN))
    assert code == 0 and body["after"]["loaded"] == ["3"]
    assert "3" in view(cli_server)["serving"]


def test_rollout_status(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, body, _ = cli(capsys, *admin(cli_server, "rollout", "status", MODEL, token=VIEWER))
    assert code == 0 and body == {"rollout": None}


# ---------------------------------------------------------------- refusals: exit code 1


def test_unloading_the_stable_version_is_refused(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    stable, _ = stable_and_other(cli_server)
    code, body, _ = cli(capsys, *admin(cli_server, "unload", MODEL, "--version", stable, token=ADMIN))
    assert code == 1 and "stable" in body["error"]
    assert stable in view(cli_server)["serving"]


def test_unknown_model_is_refused(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (("switch", "nope", "2"), ("rollback", "nope"), ("canary", "nope", "2", "10"),
                 ("shadow", "nope", "2"), ("rollout", "status", "nope")):
        code, body, _ = cli(capsys, *admin(cli_server, *argv))
        assert code == 1, argv
        assert "nope" in body["error"]
    code, body, _ = cli(capsys, *admin(cli_server, "unload", "nope", "--version", "1", token=ADMIN))
    assert code == 1


def test_unknown_version_and_no_op_switch_are_refused(cli_server: RunningServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    stable, _ = stable_and_other(cli_server)
    assert cli(capsys, *admin(cli_server, "switch", MODEL, "9"))[0] == 1
    code, body, _ = cli(capsys, *admin(cli_server, "switch", MODEL, stable))
    assert code == 1 and "already stable" in body["error"]


def test_missing_or_weak_credentials_are_refused(cli_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    stable, other = stable_and_other(cli_server)
    code, body, _ = cli(capsys, "switch", MODEL, other, "--url", cli_server.url)
    assert code == 1 and "token" in body["error"]
    assert cli(capsys, *admin(cli_server, "switch", MODEL, other, token="wrong-token-0123456789"))[0] == 1
    assert cli(capsys, *admin(cli_server, "switch", MODEL, other, token=VIEWER))[0] == 1
    assert cli(capsys, *admin(cli_server, "unload", MODEL, "--version", "3", token=OPERATOR))[0] == 1
    assert view(cli_server)["aliases"]["stable"] == stable and "3" in view(cli_server)["serving"]


# ---------------------------------------------------------------- unreachable: exit code 2


def test_an_unreachable_server_is_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (("status",), ("switch", MODEL, "2"), ("unload", MODEL, "--version", "2")):
        code, body, err = cli(capsys, *argv, "--url", url, "--token", OPERATOR)
        assert code == 2, argv
        assert body is None and "cannot reach" in err


@pytest.mark.parametrize("url", ["gateway.internal", "http://127.0.0.1:80a"])
def test_a_malformed_url_is_exit_code_2(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, _, err = cli(capsys, "status", "--url", url)
    assert code == 2 and "gateway:" in err


# ---------------------------------------------------------------- usage errors: argparse exits 2


@pytest.mark.parametrize("argv", [
    [], ["switch"], ["switch", MODEL], ["rollback"], ["canary", MODEL], ["canary", MODEL, "2"],
    ["canary", MODEL, "2", "ten"], ["shadow", MODEL], ["shadow", MODEL, "2", "--percent", "x"],
    ["unload", MODEL], ["load"], ["rollout", "start", MODEL], ["rollout", "bogus", MODEL], ["frobnicate"],
    ["rollout", "pause", MODEL, "--force"], ["rollback", MODEL, "--force"],
], ids=lambda argv: " ".join(argv) or "nothing")
def test_missing_or_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--url", "http://127.0.0.1:9"] if argv and argv[0] != "frobnicate" else argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert "usage:" in err and out == ""


# ---------------------------------------------------------------- GATEWAY_URL and GATEWAY_TOKEN


def test_url_and_token_come_from_the_environment(cli_server: RunningServer, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_URL", cli_server.url)
    monkeypatch.setenv("GATEWAY_TOKEN", OPERATOR)
    stable, other = stable_and_other(cli_server)
    code, body, _ = cli(capsys, "switch", MODEL, other)
    assert code == 0 and body["after"]["stable"] == other
    assert last_event(cli_server)["actor"] == "opal"
    code, body, _ = cli(capsys, "switch", MODEL, stable)
    assert code == 0 and view(cli_server)["aliases"]["stable"] == stable


def test_flags_override_the_environment(cli_server: RunningServer, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GATEWAY_TOKEN", VIEWER)
    assert cli(capsys, "status")[0] == 2  # the environment's URL is used when no flag is given
    _, other = stable_and_other(cli_server)
    assert cli(capsys, "canary", MODEL, other, "5", "--url", cli_server.url)[0] == 1  # viewer token from env: 403
    code, _, _ = cli(capsys, "canary", MODEL, other, "5", "--url", cli_server.url, "--token", OPERATOR)
    assert code == 0 and last_event(cli_server)["actor"] == "opal"
    assert cli(capsys, "canary", MODEL, "--clear", "--url", cli_server.url, "--token", OPERATOR)[0] == 0
