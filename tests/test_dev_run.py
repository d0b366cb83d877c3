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


def test_a_new_checkout_in_the_same_place_gets_a_new_cluster(tmp_path):
    """As root the cluster lives under /var/tmp, named after the checkout's path; a
    clone made again at that path (var/ gone) must not inherit the old database, whose
    demo organization it could not use ("The address demo@... is already taken")."""
    var = tmp_path / "var"
    first = EmbeddedPostgres(var, fsync=False, name="reclone")
    first.start()
    try:
        import psycopg2

        conn = psycopg2.connect(first.dsn())
        conn.autocommit = True
        conn.cursor().execute("CREATE TABLE left_behind (x int)")
        conn.close()
        first.stop()
        kept_outside = first.data_dir.is_dir() and not first.data_dir.is_relative_to(var)
        import shutil

        shutil.rmtree(var)  # the checkout is deleted and cloned again at the same path
        second = EmbeddedPostgres(var, fsync=False, name="reclone")
        second.start()
        conn = psycopg2.connect(second.dsn())
        cur = conn.cursor()
        cur.execute("SELECT to_regclass('left_behind') IS NULL")
        fresh = cur.fetchone()[0]
        conn.close()
        # not root: the cluster lived inside var/ and went with it; root: it was dropped
        assert fresh, "the new checkout inherited the old cluster"
        assert kept_outside == (os.geteuid() == 0)
    finally:
        EmbeddedPostgres(var, fsync=False, name="reclone").destroy()
