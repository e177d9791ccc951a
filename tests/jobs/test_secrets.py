"""jobs.secrets: the 0600 secrets file a launched process reads instead of a runtime-env literal, and
the job store taking its URL from it."""

from __future__ import annotations

import os
import stat

import pytest

from jobs import secrets
from jobs.secrets import (
    SECRET_NAMES,
    SecretsError,
    has_password,
    load_secrets,
    read_secrets_file,
    redact,
    write_secrets_file,
)
from jobs.store import JobStore

PG = "postgresql+psycopg2://peftfleet:s3cret-pw@db:5432/peftfleet"


@pytest.fixture
def env(monkeypatch):
    """Every variable jobs.secrets reads starts unset here and is put back afterwards (load_secrets writes
    os.environ directly)."""
    for name in (*SECRET_NAMES, secrets.FILE_ENV, secrets.MODE_ENV, secrets.API_KEY_FILE_ENV):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_the_file_is_written_whole_readable_by_this_user_only(tmp_path):
    path = write_secrets_file(tmp_path, {"PEFTFLEET_STORE_URL": PG, "PEFTFLEET_API_KEY": "k"})
    assert path.parent == tmp_path / "secrets" and path.suffix == ".env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_secrets_file(path) == {"PEFTFLEET_STORE_URL": PG, "PEFTFLEET_API_KEY": "k"}
    again = write_secrets_file(tmp_path, {"PEFTFLEET_STORE_URL": PG})
    assert again != path and sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, again.name])


def test_only_secret_names_on_one_line_are_written(tmp_path):
    with pytest.raises(ValueError, match="LD_PRELOAD"):
        write_secrets_file(tmp_path, {"LD_PRELOAD": "/tmp/x.so"})
    with pytest.raises(ValueError, match="PEFTFLEET_API_KEY holds a line break"):
        write_secrets_file(tmp_path, {"PEFTFLEET_API_KEY": "k\nLD_PRELOAD=/tmp/x.so"})
    assert not (tmp_path / "secrets").exists() or not list((tmp_path / "secrets").iterdir())


def test_a_file_others_can_read_or_a_link_is_refused(tmp_path, env):
    path = write_secrets_file(tmp_path, {"PEFTFLEET_STORE_URL": PG})
    path.chmod(0o640)
    env.setenv(secrets.FILE_ENV, str(path))
    with pytest.raises(SecretsError, match="readable by others .*0600"):
        load_secrets()
    assert "PEFTFLEET_STORE_URL" not in os.environ
    path.chmod(0o600)
    link = tmp_path / "link.env"
    link.symlink_to(path)
    with pytest.raises(OSError):
        read_secrets_file(link)


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a file to another user")
def test_a_file_of_another_user_is_refused(tmp_path):
    path = write_secrets_file(tmp_path, {"PEFTFLEET_STORE_URL": PG})
    os.chown(path, 65534, 65534)
    with pytest.raises(SecretsError, match="another user"):
        read_secrets_file(path)


def test_loading_sets_only_the_secret_names(tmp_path, env):
    path = tmp_path / "hand.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, f"PEFTFLEET_STORE_URL={PG}\nLD_PRELOAD=/tmp/x.so\nnot a line\n".encode())
    os.close(fd)
    env.setenv(secrets.FILE_ENV, str(path))
    assert load_secrets() == {"PEFTFLEET_STORE_URL": PG}
    assert os.environ["PEFTFLEET_STORE_URL"] == PG and "LD_PRELOAD" not in os.environ


def test_the_job_store_takes_its_url_from_the_secrets_file(tmp_path, env):
    url = f"sqlite:///{tmp_path / 'from-file.db'}"
    env.setenv(secrets.FILE_ENV, str(write_secrets_file(tmp_path, {"PEFTFLEET_STORE_URL": url})))
    store = JobStore(home=tmp_path / "home")
    assert store.url == url and (tmp_path / "from-file.db").exists()


def test_cluster_mode_without_the_secret_is_an_error_not_the_default_store(tmp_path, env):
    env.setenv(secrets.MODE_ENV, "cluster")
    with pytest.raises(SecretsError, match="PEFTFLEET_SECRETS=cluster but this process has no PEFTFLEET_STORE_URL"):
        JobStore(home=tmp_path / "home")
    assert not (tmp_path / "home" / "peftfleet.db").exists()
    env.setenv("PEFTFLEET_API_KEY", "from-the-pod")
    assert secrets.api_key() == "from-the-pod"


def test_the_api_key_file(tmp_path, env):
    (tmp_path / "key").write_text("k3y\n")
    env.setenv(secrets.API_KEY_FILE_ENV, str(tmp_path / "key"))
    assert secrets.api_key() == "k3y"
    (tmp_path / "key").write_text("\n")
    with pytest.raises(SecretsError, match="one line"):
        secrets.api_key()


def test_passwords_are_found_and_masked():
    assert has_password(PG) and has_password("s3://key:secret@bucket/x")
    assert not has_password("postgresql+psycopg2://peftfleet@db/p") and not has_password("sqlite:////a:b@c/x.db")
    assert not has_password(None)
    text = f"no job 'x' in {PG} (also s3://key:secret@bucket/x)"
    assert redact(text) == "no job 'x' in postgresql+psycopg2://peftfleet:***@db:5432/peftfleet (also s3://key:***@bucket/x)"
