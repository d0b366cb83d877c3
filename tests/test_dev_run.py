"""`make run`'s banner says where the development database really lives (as root that is
not under ./var: the postgres user cannot reach a checkout in /root)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from agentpost.dev.embedded_pg import EmbeddedPostgres
from agentpost.dev.run import _banner, database_location

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_banner_prints_the_data_directory(tmp_path, capsys):
    """The exact data directory, under /var/tmp as root and under ./var otherwise."""
    cluster = EmbeddedPostgres(tmp_path / "var", name="pg")
    if os.geteuid() == 0:
        assert cluster.data_dir.parent.name.startswith("agentpost-pg-")
        assert tmp_path not in cluster.data_dir.parents
    else:
        assert cluster.data_dir == (tmp_path / "var" / "pg" / "data").resolve()
    demo = {"api_key": "ap_sk_demo", "org_id": "org_1", "environment_id": "env_1"}
    _banner(demo, Path("var/agentpost.toml"), SimpleNamespace(ca_cert="var/tls/ca.crt"),
            database_location(cluster))
    assert f" Database:      {cluster.data_dir}  (server log {cluster.log_file})" in \
        capsys.readouterr().out
    assert "AGENTPOST_DATABASE_URL" in database_location(None)


def test_the_readme_names_both_places():
    """The README used to say ./var/pg only, which is wrong as root."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "`./var/pg/data`" in text and "/var/tmp/agentpost-pg-<hash>-pg/data" in text
