import subprocess
import sys
from pathlib import Path

import pytest
from yarl import URL

from fileproxy.settings import (
    SETTINGS_TABLE,
    ConfigError,
    Settings,
    env_file_template,
    markdown_table,
    redact_url,
)

ROOT = Path(__file__).resolve().parents[2]

SEED_DEFAULTS = {
    "HTTP_CONNECTOR_LIMIT": 200,
    "HTTP_CONNECTOR_LIMIT_PER_HOST": 50,
    "HTTP_KEEPALIVE_TIMEOUT": 60,
    "HTTP_CONNECT_TIMEOUT": 15,
    "HTTP_TOTAL_TIMEOUT": 90,
    "HTTP_DNS_CACHE_TTL": 600,
    "STREAM_CHUNK_SIZE": 16384,
    "BUFFER_SIZE": 131072,
    "REDIS_POOL_SIZE": 150,
}


def test_seed_variables_keep_their_names_and_defaults():
    settings = Settings.from_env({})
    by_env = {spec.env: getattr(settings, spec.attr) for spec in SETTINGS_TABLE}
    for name, default in SEED_DEFAULTS.items():
        assert by_env[name] == default, name


def test_contract_defaults():
    settings = Settings.from_env({})
    assert str(settings.bind) == "127.0.0.1:10080"
    assert settings.upstream == URL("http://127.0.0.1:27804")
    assert settings.redis_url is None


def test_values_are_parsed_from_the_environment():
    settings = Settings.from_env(
        {
            "HTTP_CONNECTOR_LIMIT": "7",
            "HTTP_CONNECT_TIMEOUT": "2.5",
            "FILEPROXY_BIND": "unix:/run/fileproxy.sock",
            "FILEPROXY_ACCESS_LOG": "off",
            "FILEPROXY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1",
            "REDIS_URL": "redis://:pw@127.0.0.1:6380/2",
        }
    )
    assert settings.connector_limit == 7
    assert settings.connect_timeout == 2.5
    assert settings.bind.path == "/run/fileproxy.sock"
    assert settings.access_log is False
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "192.168.1.1/32"]
    assert settings.redis_url is not None and settings.redis_url.port == 6380


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("HTTP_CONNECTOR_LIMIT", "abc", "integer from 1 to 100000"),
        ("HTTP_CONNECTOR_LIMIT", "0", "integer from 1 to 100000"),
        ("STREAM_CHUNK_SIZE", "12", "integer from 1024"),
        ("HTTP_CONNECT_TIMEOUT", "-1", "seconds from"),
        ("HTTP_TOTAL_TIMEOUT", "nan", "seconds from"),
        ("FILEPROXY_UPSTREAM", "ftp://example.org", "unknown scheme 'ftp'"),
        ("FILEPROXY_UPSTREAM", "http://", "with a host"),
        ("REDIS_URL", "http://127.0.0.1:6379", "unknown scheme 'http'"),
        ("FILEPROXY_BIND", "10080", "HOST:PORT"),
        ("FILEPROXY_BIND", "unix:relative.sock", "unix:/absolute/path"),
        ("FILEPROXY_ACCESS_LOG", "maybe", "on/off"),
        ("FILEPROXY_LOG_FORMAT", "xml", "json, text"),
        ("FILEPROXY_TRUSTED_PROXIES", "10.0.0.0/33", "CIDR"),
        ("FILEPROXY_LIMIT_ERROR_STATUSES", "503,5xx", "HTTP statuses 400..599, got '5xx'"),
        ("FILEPROXY_LIMIT_ERROR_STATUSES", "200", "HTTP statuses 400..599, got '200'"),
    ],
)
def test_bad_values_name_the_variable_the_value_and_what_is_allowed(env, value, fragment):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({env: value})
    message = str(info.value)
    assert info.value.env == env
    assert message.startswith(f"invalid {env}=")
    assert fragment in message
    assert "\n" not in message


def test_limiter_error_statuses():
    assert Settings.from_env({}).limit_error_statuses == (502, 503, 504)
    chosen = Settings.from_env({"FILEPROXY_LIMIT_ERROR_STATUSES": " 503, 500 ,503,"})
    assert chosen.limit_error_statuses == (500, 503)
    assert chosen.public_dict()["FILEPROXY_LIMIT_ERROR_STATUSES"] == "500,503"
    assert Settings.from_env({"FILEPROXY_LIMIT_ERROR_STATUSES": ""}).limit_error_statuses == ()


def test_bad_url_error_does_not_leak_the_password():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"REDIS_URL": "http://user:hunter2@example.org"})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("http://admin:hunter2@backend:8080/base", "http://***@backend:8080/base"),
        ("http://token@backend:8080", "http://***@backend:8080"),
        ("http://backend:8080", "http://backend:8080"),
    ],
)
def test_redaction(url, shown):
    assert redact_url(URL(url)) == shown


def test_public_view_has_no_secrets():
    settings = Settings.from_env(
        {"REDIS_URL": "redis://:hunter2@127.0.0.1:6379/0", "FILEPROXY_UPSTREAM": "http://u:pw@h:1"}
    )
    text = repr(settings.public_dict())
    assert "hunter2" not in text and ":pw@" not in text
    assert settings.public_dict()["REDIS_URL"] == "redis://***@127.0.0.1:6379/0"


def test_configuration_doc_table_matches_the_settings_table():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    begin, end = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"
    assert begin in doc and end in doc, "docs/configuration.md lacks the settings table markers"
    table = doc.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == markdown_table(), "regenerate with: fileproxy config --format markdown"


def test_shipped_env_file_matches_the_settings_table():
    shipped = (ROOT / "conf" / "fileproxy.env").read_text()
    assert shipped == env_file_template(), (
        "regenerate with: fileproxy config --format env-template > conf/fileproxy.env"
    )


def _run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fileproxy", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize("command", [["serve"], ["config"], ["check"]])
def test_bad_setting_stops_with_one_line_and_exit_code_2(command):
    result = _run_cli(*command, HTTP_CONNECTOR_LIMIT="lots")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "fileproxy: invalid HTTP_CONNECTOR_LIMIT='lots': expected an integer from 1 to 100000"
    ]


def test_config_command_redacts_secrets():
    result = _run_cli("config", REDIS_URL="redis://:hunter2@127.0.0.1:6379/0")
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "REDIS_URL=redis://***@127.0.0.1:6379/0  # env" in result.stdout
    assert "HTTP_CONNECTOR_LIMIT=200  # default" in result.stdout


def test_upstream_takes_replicas_with_weights_and_backups():
    settings = Settings.from_env(
        {"FILEPROXY_UPSTREAM": "http://a:1/base;weight=3, http://u:pw@b:2 ,http://c:3;backup"}
    )
    assert [spec.name for spec in settings.upstreams] == ["a:1", "b:2", "c:3"]
    assert [(s.weight, s.backup) for s in settings.upstreams] == [(3, False), (1, False), (1, True)]
    assert settings.upstream == URL("http://a:1/base")  # the first, as with one URL
    shown = settings.public_dict()["FILEPROXY_UPSTREAM"]
    assert shown == "http://a:1/base;weight=3,http://***@b:2,http://c:3;backup"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("http://a:1,http://a:1", "a:1 is listed twice"),
        ("http://a:1;weight=0", "unknown option 'weight=0'"),
        ("http://a:1;sticky", "unknown option 'sticky'"),
        ("http://a:1;backup", "at least one replica that is not ;backup"),
        ("http://a:1,ftp://b:2", "replica 2: unknown scheme 'ftp'"),
        (" , ", "one or more base URLs"),
        ("http://a:1,", "an empty entry (a stray comma)"),
        ("http://a:1, ,http://b:2", "an empty entry (a stray comma)"),
        (",http://a:1", "an empty entry (a stray comma)"),
    ],
)
def test_bad_replica_lists_name_the_variable(value, fragment):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"FILEPROXY_UPSTREAM": value})
    assert info.value.env == "FILEPROXY_UPSTREAM"
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_replica_list_does_not_leak_a_password():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"FILEPROXY_UPSTREAM": "http://a:1,http://u:hunter2@b:2,ftp://c"})
    assert "hunter2" not in str(info.value)


def test_upstream_ca_must_be_a_pem_file_of_certificates(tmp_path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("this is no certificate\n")
    for value, fragment in [
        (str(tmp_path / "missing.pem"), "no such file"),
        (str(not_pem), "expected a PEM file of CA certificates"),
        (str(tmp_path), "expected a PEM file of CA certificates"),
    ]:
        with pytest.raises(ConfigError) as info:
            Settings.from_env({"FILEPROXY_UPSTREAM_CA": value})
        assert info.value.env == "FILEPROXY_UPSTREAM_CA", value
        assert fragment in str(info.value), str(info.value)
        assert "\n" not in str(info.value)
    settings = Settings.from_env({})
    assert (settings.upstream_ca, settings.upstream_tls_verify) == ("", True)
