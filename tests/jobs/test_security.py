"""Security defaults that need no cluster: the Ray token file is owner-only."""
import stat

import pytest

from jobs.runtime import private_token_file


@pytest.fixture
def no_env_token(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_missing_token_file_is_created_owner_only(tmp_path, no_env_token):
    path = tmp_path / ".ray" / "auth_token"
    assert private_token_file(path) == path
    assert mode(path) == 0o600
    token = path.read_text()
    assert len(token) == 64 and set(token) <= set("0123456789abcdef")  # 256 random bits, hex, as Ray's own generator
    private_token_file(path)
    assert path.read_text() == token  # an existing token is never replaced


def test_readable_token_file_is_restricted_not_rewritten(tmp_path, no_env_token):
    path = tmp_path / "auth_token"
    path.write_text("abc123")
    path.chmod(0o644)
    private_token_file(path)
    assert mode(path) == 0o600 and path.read_text() == "abc123"


def test_joining_a_cluster_creates_no_token(tmp_path, no_env_token):
    path = tmp_path / "auth_token"
    assert private_token_file(path, create=False) is None
    assert not path.exists()


def test_token_from_environment_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    path = tmp_path / "auth_token"
    assert private_token_file(path) is None
    assert not path.exists()
