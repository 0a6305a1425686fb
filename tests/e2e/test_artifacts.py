"""Artifacts end to end: built once, handed on by digest, signed, verified, refused if altered."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

from tests.e2e.conftest import Repo

PIPELINE = """\
pipeline: shop
artifacts:
  app: {path: dist/app.tar.gz}
  site: {path: build/site/, kind: dir}
stages:
  - name: commit
    jobs:
      build:
        run: |
          mkdir -p dist build/site/css
          echo "app $RANDOM $RANDOM" > dist/app.txt
          tar -czf dist/app.tar.gz -C dist app.txt
          echo '<h1>shop</h1>' > build/site/index.html
          echo 'body{}' > build/site/css/main.css
        outputs: [app, site]
      after-build:
        needs: [build]
        run: |
          test -f "$CONVEYOR_ARTIFACT_APP"
          echo "$CONVEYOR_ARTIFACT_APP_DIGEST" > got-in-stage.txt
  - name: acceptance
    jobs:
      e2e:
        run: |
          set -e
          test -f "$CONVEYOR_ARTIFACT_APP"
          test -f "$CONVEYOR_ARTIFACT_SITE/css/main.css"
          sha=$(sha256sum "$CONVEYOR_ARTIFACT_APP" | cut -d' ' -f1)
          test "sha256:$sha" = "$CONVEYOR_ARTIFACT_APP_DIGEST"
          echo "e2e saw $CONVEYOR_ARTIFACT_APP_DIGEST"
      smoke:
        run: echo "smoke saw $CONVEYOR_ARTIFACT_APP_DIGEST $CONVEYOR_ARTIFACT_SITE_DIGEST"
"""


def published(repo: Repo, run: str = "latest") -> dict[str, dict[str, object]]:
    result = repo.conveyor("artifacts", "list", "--run", run, "--json")
    assert result.code == 0, result.err
    return {item["name"]: item for item in result.json()}


def test_built_once_and_every_consumer_gets_the_same_digest(repo: Repo) -> None:
    repo.pipeline(PIPELINE)
    result = repo.conveyor("run", "--progress", "plain")
    assert result.code == 0, result.out + result.err
    items = published(repo)
    assert set(items) == {"app", "site"}
    app = items["app"]["digest"]
    assert isinstance(app, str) and app.startswith("sha256:")
    e2e = repo.conveyor("logs", "latest", "e2e").out
    smoke = repo.conveyor("logs", "latest", "smoke").out
    assert f"e2e saw {app}" in e2e
    assert f"smoke saw {app} {items['site']['digest']}" in smoke

    # The bytes fetched from the store are the ones the consumers saw.
    out = repo.path.parent / "fetched.tar.gz"
    got = repo.conveyor("artifacts", "get", "app@latest", "-o", str(out))
    assert got.code == 0, got.err
    assert "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest() == app
    site = repo.path.parent / "site"
    assert repo.conveyor("artifacts", "get", "site", "-o", str(site)).code == 0
    assert (site / "css" / "main.css").read_text() == "body{}\n"

    shown = repo.conveyor("artifacts", "show", app, "--json").json()
    assert shown["name"] == "app" and shown["job"] == "build"
    assert shown["provenance"]["revision"] == repo.git("rev-parse", "HEAD").strip()


def test_a_cached_build_hands_on_the_same_bytes_without_rebuilding(repo: Repo) -> None:
    repo.pipeline(PIPELINE)
    assert repo.conveyor("run").code == 0
    first = published(repo, "1")
    assert repo.conveyor("run").code == 0
    second = published(repo, "2")
    # $RANDOM in the build: a rebuild would have produced other bytes.
    assert second["app"]["digest"] == first["app"]["digest"]
    assert second["app"]["built_by_run"] == 1
    assert repo.jobs("2")["build"]["status"] == "cached"
    assert f"e2e saw {first['app']['digest']}" in repo.conveyor("logs", "2", "e2e").out


def test_provenance_verifies_offline_with_only_the_public_key(repo: Repo) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    repo.pipeline(PIPELINE)
    assert repo.conveyor("run").code == 0
    pem = repo.conveyor("keys", "show").out
    envelope = json.loads(repo.conveyor("artifacts", "provenance", "app@latest").out)
    key = load_pem_public_key(pem.encode())
    assert isinstance(key, Ed25519PublicKey)
    payload = base64.b64decode(envelope["payload"])
    ptype = envelope["payloadType"].encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(payload), payload)
    key.verify(base64.b64decode(envelope["signatures"][0]["sig"]), pae)  # raises if bad
    statement = json.loads(payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    digest = published(repo)["app"]["digest"]
    assert statement["subject"][0]["digest"]["sha256"] == str(digest).removeprefix("sha256:")

    verified = repo.conveyor("verify", "app@latest", "--json")
    assert verified.code == 0, verified.out + verified.err
    assert verified.json()["verified"] is True

    key_file = repo.path / ".conveyor" / "keys" / "instance.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The key never reaches a job: no job environment names it.
    env_dump = repo.conveyor("logs", "latest", "smoke").out
    assert "PRIVATE KEY" not in env_dump


def test_tampered_blob_is_refused_and_a_consumer_fails(repo: Repo) -> None:
    repo.pipeline(PIPELINE)
    assert repo.conveyor("run").code == 0
    digest = str(published(repo)["app"]["digest"])
    hexd = digest.removeprefix("sha256:")
    blob = repo.path / ".conveyor" / "artifacts" / "sha256" / hexd[:2] / hexd[2:]
    os.chmod(blob, 0o644)
    blob.write_bytes(b"evil bytes")
    result = repo.conveyor("verify", digest)
    assert result.code == 1
    assert "FAIL digest" in result.out and "corrupt" in result.out
    out = repo.path.parent / "x"
    got = repo.conveyor("artifacts", "get", digest, "-o", str(out))
    assert got.code != 0 and not out.exists()
    assert "Traceback" not in got.err


def test_tampered_provenance_and_foreign_key_are_refused(repo: Repo, tmp_path: Path) -> None:
    repo.pipeline(PIPELINE)
    assert repo.conveyor("run").code == 0
    envelope = json.loads(repo.conveyor("artifacts", "provenance", "app@latest").out)
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["buildDefinition"]["externalParameters"]["revision"] = "0" * 40
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    db = repo.path / ".conveyor" / "conveyor.db"
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("UPDATE artifacts SET provenance = ? WHERE name = 'app'", (json.dumps(envelope),))
    conn.commit()
    conn.close()
    result = repo.conveyor("verify", "app@latest")
    assert result.code == 1
    assert "FAIL signature" in result.out

    # Another instance's key: the site artifact is intact but not signed by that key.
    other = tmp_path / "other-home"
    pem = repo.conveyor("keys", "show", "--home", str(other)).out
    key_file = tmp_path / "other.pub"
    key_file.write_text(pem)
    foreign = repo.conveyor("verify", "site@latest", "--key", str(key_file))
    assert foreign.code == 1
    assert "FAIL signature" in foreign.out
    # The record itself shows the alteration of the read model is not in the event chain.
    assert repo.conveyor("audit", "verify").code == 0


def test_a_missing_or_hostile_output_fails_the_job_with_a_reason(repo: Repo) -> None:
    repo.pipeline(
        """\
        pipeline: shop
        artifacts:
          app: {path: dist/app.bin}
          site: {path: build/, kind: dir}
        stages:
          - name: commit
            jobs:
              forgot: {run: "true", outputs: [app]}
              escape:
                run: mkdir -p build && ln -s /etc/passwd build/passwd
                outputs: [site]
          - name: later
            jobs:
              never: {run: "true"}
        """
    )
    result = repo.conveyor("run", "--progress", "plain")
    assert result.code == 1
    jobs = repo.jobs()
    assert jobs["forgot"]["status"] == "failed"
    assert jobs["escape"]["status"] == "failed"
    assert jobs["never"]["status"] == "skipped"
    assert "was not produced" in repo.conveyor("logs", "latest", "forgot").out
    assert "passwd" in repo.conveyor("logs", "latest", "escape").out
    assert published(repo) == {}


def test_received_artifacts_do_not_dirty_the_checkout(repo: Repo) -> None:
    repo.pipeline(
        PIPELINE.replace(
            'run: echo "smoke saw',
            'run: test -z "$(git status --porcelain | grep conveyor-artifacts)" && echo "smoke saw',
        )
    )
    result = repo.conveyor("run")
    assert result.code == 0, repo.conveyor("logs", "latest", "smoke").out


def test_bad_references_are_explained(repo: Repo) -> None:
    repo.pipeline(PIPELINE)
    assert repo.conveyor("run").code == 0
    for ref, message in [
        ("nope@latest", "run 1 published no artifact named 'nope'"),
        ("app@99", "there is no run '99'"),
        ("sha256:abc", "is not a sha256 digest"),
        ("../../etc", "is not an artifact reference"),
        ("app@", "is not an artifact reference"),
        ("sha256:" + "0" * 64, "no run published an artifact with digest"),
    ]:
        result = repo.conveyor("artifacts", "show", ref)
        assert result.code == 2, (ref, result.err)
        assert message in result.err, (ref, result.err)
        assert "Traceback" not in result.err


def test_a_stage_run_alone_receives_the_artifacts_built_from_the_same_inputs(repo: Repo) -> None:
    repo.pipeline(PIPELINE)
    plan = repo.conveyor("plan", "--stage", "acceptance", "--json").json()  # nothing built yet
    e2e = plan["stages"][1]["levels"][0][0]
    assert e2e["action"] == "run" and "will not be available" in e2e["reason"]
    assert repo.conveyor("run").code == 0
    built = published(repo)["app"]["digest"]
    alone = repo.conveyor("run", "--stage", "acceptance", "--no-cache", "--progress", "plain")
    assert alone.code == 1  # --no-cache: the unselected build is not taken from the cache
    assert "not available to later stages" in alone.out
    alone = repo.conveyor("run", "--stage", "acceptance", "--progress", "plain")
    assert alone.code == 0, alone.out + alone.err
    assert published(repo)["app"]["digest"] == built
    log = repo.conveyor("logs", "latest", "smoke").out
    assert built in log


def test_get_does_not_replace_an_existing_file_without_force(repo: Repo, tmp_path: Path) -> None:
    repo.pipeline(PIPELINE)
    assert repo.conveyor("run").code == 0
    target = tmp_path / "precious"
    target.write_text("keep me")
    refused = repo.conveyor("artifacts", "get", "app@1", "-o", str(target))
    assert refused.code == 2 and "exists already" in refused.err
    assert target.read_text() == "keep me"
    assert repo.conveyor("artifacts", "get", "app@1", "-o", str(tmp_path / "no/dir/x")).code == 2
    replaced = repo.conveyor("artifacts", "get", "app@1", "-o", str(target), "--force")
    assert replaced.code == 0 and target.read_bytes() != b"keep me"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    special = repo.conveyor("artifacts", "get", "app@1", "-o", str(fifo), "--force")
    assert special.code == 2 and "not a regular file" in special.err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the pipe
