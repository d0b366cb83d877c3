"""conf.d drop-ins merged over the main configuration file."""

import os

import pytest

from agentpost.config import ConfigError
from agentpost.config.dropins import DropinError, dropin_files, merge_tomls
from agentpost.config.loader import parse_config


def write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text, encoding="utf-8")


def test_missing_directory_means_no_dropins(tmp_path):
    main = {"server": {"hostname": "a.example"}}
    assert merge_tomls(main, tmp_path / "conf.d") == main
    assert dropin_files(tmp_path / "conf.d") == []


def test_later_file_wins_key_by_key(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "10-hostname.toml", '[server]\nhostname = "mx.example.org"\n')
    write(d, "20-http.toml", "[http]\nport = 8443\ntls = true\n")
    write(d, "90-local.toml", "[http]\nport = 9443\n")
    main = {"server": {"hostname": "localhost", "environment": "production"},
            "http": {"bind": "127.0.0.1", "port": 8080}}
    merged = merge_tomls(main, d)
    assert merged == {
        "server": {"hostname": "mx.example.org", "environment": "production"},
        "http": {"bind": "127.0.0.1", "port": 9443, "tls": True},
    }
    # the main document is left as it was
    assert main["http"]["port"] == 8080 and "tls" not in main["http"]


def test_lexical_order_not_creation_order(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "b.toml", '[server]\nhostname = "b"\n')
    write(d, "a.toml", '[server]\nhostname = "a"\n')
    write(d, "B.toml", '[server]\nhostname = "B"\n')
    assert [p.name for p in dropin_files(d)] == ["B.toml", "a.toml", "b.toml"]
    assert merge_tomls({}, d)["server"]["hostname"] == "b"


def test_lists_are_replaced_not_appended(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "50-proxies.toml", '[http]\ntrusted_proxies = ["10.0.0.1"]\n')
    merged = merge_tomls({"http": {"trusted_proxies": ["127.0.0.1", "::1"]}}, d)
    assert merged["http"]["trusted_proxies"] == ["10.0.0.1"]


def test_nested_tables_merge_recursively(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "1.toml", "[a.b]\nx = 1\n")
    merged = merge_tomls({"a": {"b": {"y": 2}, "c": 3}}, d)
    assert merged == {"a": {"b": {"x": 1, "y": 2}, "c": 3}}


def test_only_visible_toml_files_count(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "10-a.toml", '[server]\nhostname = "a"\n')
    for name in (".hidden.toml", "10-a.toml~", "10-a.toml.dpkg-dist", "10-a.toml.dpkg-old",
                 "README", "20-b.toml.disabled"):
        write(d, name, "this is not TOML at all [[[")
    (d / "sub.toml").mkdir()
    (d / "sub.toml" / "x.toml").write_text('[server]\nhostname = "nested"\n')
    assert [p.name for p in dropin_files(d) if p.is_file()] == ["10-a.toml"]


def test_invalid_toml_names_the_file(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "20-broken.toml", "[server\nhostname = 1\n")
    with pytest.raises(DropinError) as info:
        merge_tomls({}, d)
    assert info.value.key == "config"
    assert "20-broken.toml" in info.value.problem and "not valid TOML" in info.value.problem


def test_not_utf8_names_the_file(tmp_path):
    d = tmp_path / "conf.d"
    d.mkdir()
    (d / "30-latin1.toml").write_bytes(b'[server]\nhostname = "caf\xe9"\n')
    with pytest.raises(DropinError, match=r"30-latin1\.toml"):
        merge_tomls({}, d)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_names_the_file(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "40-secret.toml", '[database]\nurl = "postgresql:///x"\n')
    (d / "40-secret.toml").chmod(0)
    with pytest.raises(DropinError, match=r"cannot read .*40-secret\.toml"):
        merge_tomls({}, d)


def test_directory_path_that_is_a_file(tmp_path):
    (tmp_path / "conf.d").write_text("")
    with pytest.raises(DropinError, match="not a directory"):
        merge_tomls({}, tmp_path / "conf.d")


def test_origins_record_the_last_file_to_set_each_key(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "10.toml", '[http]\nport = 1\nbind = "::"\n')
    write(d, "20.toml", "[http]\nport = 2\n")
    origins = {}
    merge_tomls({"server": {"hostname": "h"}}, d, origins)
    assert origins == {"http.port": str(d / "20.toml"), "http.bind": str(d / "10.toml")}


def test_unknown_keys_in_a_dropin_are_still_errors(tmp_path):
    """The loader validates the merged document: a typo in a drop-in is exit-2 material."""
    d = tmp_path / "conf.d"
    write(d, "20-typo.toml", "[http]\nprot = 8080\n")
    origins = {}
    merged = merge_tomls({"http": {"port": 8080}}, d, origins)
    with pytest.raises(ConfigError) as info:
        parse_config(merged, "test", environ={})
    assert info.value.key == "http.prot"
    assert origins["http.prot"].endswith("20-typo.toml")


def test_unknown_section_in_a_dropin_is_an_error(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "20-typo.toml", '[sever]\nhostname = "x"\n')
    with pytest.raises(ConfigError, match="sever: unknown section"):
        parse_config(merge_tomls({}, d), "test", environ={})


def test_merged_document_validates(tmp_path):
    d = tmp_path / "conf.d"
    write(d, "10-hostname.toml", '[server]\nhostname = "mx.example.org"\n')
    write(d, "30-database.toml", '[database]\nurl = "postgresql:///agentpost"\n')
    config = parse_config(merge_tomls({"http": {"port": 8081}}, d), "test", environ={})
    assert config.server.hostname == "mx.example.org"
    assert config.database.url == "postgresql:///agentpost"
    assert config.http.port == 8081
