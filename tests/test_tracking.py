"""pipeline.tracking: reachability checks that never print credentials; URI redaction."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest
from helpers import run_cli

from pipeline.console import UserError
from pipeline.tracking import check_reachable, redact_uri, safe_params


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).seen.append(self.headers.get("Authorization"))
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def health_server():
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_credentials_in_uri_are_sent_as_basic_auth(health_server):
    check_reachable(f"http://bot:S3cret%21@127.0.0.1:{health_server}")
    assert _Recorder.seen == ["Basic " + base64.b64encode(b"bot:S3cret!").decode()]
    check_reachable(f"http://127.0.0.1:{health_server}")
    assert _Recorder.seen[-1] is None


def test_unreachable_server_error_never_shows_the_password():
    with pytest.raises(UserError) as exc:
        check_reachable("http://bot:S3cretPass@127.0.0.1:1", timeout=2)
    assert "S3cretPass" not in str(exc.value) and "bot" not in str(exc.value)
    assert "http://127.0.0.1:1" in str(exc.value)


def test_redact_uri_and_safe_params():
    assert redact_uri("https://a:b@host:5000/x?y=1") == "https://host:5000/x?y=1"
    assert redact_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
    params = safe_params({"lr": 0.1, "aws_secret_access_key": "x", "db_password": "y", "n": None})
    assert params == {"lr": "0.1", "n": ""}


def test_info_and_evaluate_do_not_print_tracking_passwords(tmp_path):
    uri = "http://alice:s3cr3t@127.0.0.1:1"
    info = run_cli("info", "--json", env={"MLFLOW_TRACKING_URI": uri}, check=True)
    assert "s3cr3t" not in info.stdout + info.stderr
    assert '"mlflow_tracking_uri": "http://127.0.0.1:1"' in info.stdout
    import numpy as np

    from pipeline.imageio import write_png

    write_png(tmp_path / "img.png", np.zeros((24, 24, 3), np.uint8))
    bad = run_cli("evaluate", "--model", "bicubic", "--benchmarks", str(tmp_path), "--scale", "2", "--tracking-uri", uri)
    assert bad.returncode == 1 and "not reachable" in bad.stderr
    assert "s3cr3t" not in bad.stdout + bad.stderr


def test_ui_command_opens_the_store_it_was_given(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train and demo print it: a run in another store must not be sent to the default one."""
    from pipeline import defaults
    from pipeline.tracking import ui_command

    monkeypatch.setenv(defaults.HOME_ENV, str(tmp_path))
    default = defaults.default_tracking_uri()
    assert ui_command(default).endswith(" ui")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    cmd = ui_command(other)
    assert cmd.endswith(f" ui --tracking-uri {other}")
    assert cmd.startswith(f"{defaults.HOME_ENV}={tmp_path} ")  # the home the store lives under
