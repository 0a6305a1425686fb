"""Signed checkpoints kept off the machine: what a rewrite of the whole record cannot hide."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conveyor.store.sqlite import GENESIS, event_hash
from tests.e2e.conftest import Repo

SIMPLE = """\
pipeline: simple
stages:
  - name: only
    jobs:
      a: {run: "true"}
"""


def rewrite_history(home: Path, seq: int) -> None:
    """What someone who can write the home can do: alter event ``seq``, then recompute every
    hash after it and the head mark, so that the chain and the mark both verify."""
    conn = sqlite3.connect(home / "conveyor.db")
    conn.execute("DROP TRIGGER events_append_only_update")
    conn.execute(
        "UPDATE events SET payload = replace(payload, '\"run_id\"', '\"run_id\" ') WHERE seq = ?",
        (seq,),
    )
    prev, last = GENESIS, 0
    for row in conn.execute(
        "SELECT seq, at, type, run_id, payload FROM events ORDER BY seq"
    ).fetchall():
        digest = event_hash(prev, row[0], row[1], row[2], row[3], row[4])
        conn.execute(
            "UPDATE events SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, row[0])
        )
        prev, last = digest, row[0]
    conn.commit()
    conn.close()
    (home / "conveyor.db.head").write_text(json.dumps({"seq": last, "hash": prev}))


def test_a_checkpoint_sees_a_rewritten_history_that_the_chain_cannot(
    repo: Repo, tmp_path: Path
) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    checkpoint = tmp_path / "offbox" / "checkpoint.json"
    checkpoint.parent.mkdir()
    made = repo.conveyor("audit", "checkpoint", "-o", str(checkpoint))
    assert made.code == 0, made.err
    assert "checkpoint of event" in made.err and "written to" in made.err
    envelope = json.loads(checkpoint.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    events = repo.conveyor("audit", "verify", "--json").json()["events"]
    assert statement["seq"] == events and statement["_type"] == "conveyor.checkpoint/v1"
    assert repo.conveyor("run", "--no-cache").code == 0  # the log goes on past it
    ok = repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint))
    assert ok.code == 0, ok.err
    assert f"(event {events}, signed" in ok.out

    rewrite_history(repo.path / ".conveyor", 2)
    assert repo.conveyor("audit", "verify").code == 0  # the chain and the mark were redone
    caught = repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint), "--json")
    assert caught.code == 1
    doc = caught.json()
    assert doc["ok"] is False and doc["problem"] is None  # the chain itself verifies
    assert doc["checkpoints"][0]["problem"] == (
        f"event {events} is not the one it vouches for: the log was rewritten since"
    )
    plain = repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint))
    assert plain.code == 1 and "1 of 1 checkpoints no longer hold" in plain.err


def test_a_checkpoint_sees_an_older_copy_of_the_record_put_back(repo: Repo, tmp_path: Path) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    home = repo.path / ".conveyor"
    assert repo.conveyor("audit", "checkpoint", "-o", str(tmp_path / "old.json")).code == 0
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in ("conveyor.db", "conveyor.db-wal", "conveyor.db-shm", "conveyor.db.head"):
        if (home / name).exists():
            shutil.copy2(home / name, backup / name)
    assert repo.conveyor("run", "--no-cache").code == 0
    made = repo.conveyor("audit", "checkpoint")  # to standard output
    assert made.code == 0
    (tmp_path / "new.json").write_text(made.out)
    for name in ("conveyor.db", "conveyor.db-wal", "conveyor.db-shm", "conveyor.db.head"):
        (home / name).unlink(missing_ok=True)
        if (backup / name).exists():
            shutil.copy2(backup / name, home / name)
    assert repo.conveyor("audit", "verify").code == 0  # a consistent older record
    result = repo.conveyor(
        "audit",
        "verify",
        "--checkpoint",
        str(tmp_path / "old.json"),
        "--checkpoint",
        str(tmp_path / "new.json"),
        "--json",
    )
    assert result.code == 1
    old, new = result.json()["checkpoints"]
    assert old["ok"] is True
    assert new["ok"] is False and "events were removed from its end" in new["problem"]


@pytest.mark.slow
def test_forged_foreign_and_hostile_checkpoints_do_not_verify(repo: Repo, tmp_path: Path) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    good = tmp_path / "good.json"
    assert repo.conveyor("audit", "checkpoint", "-o", str(good)).code == 0
    envelope = json.loads(good.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    # A checkpoint whose payload was changed after signing (an attacker's "newer" head).
    forged = dict(
        envelope, payload=base64.b64encode(json.dumps(dict(statement, seq=1)).encode()).decode()
    )
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    # One made by another instance (another home, another key).
    other = Repo(tmp_path / "other")
    other.pipeline(SIMPLE)
    assert other.conveyor("run").code == 0
    assert other.conveyor("audit", "checkpoint", "-o", str(tmp_path / "foreign.json")).code == 0
    (tmp_path / "garbage.json").write_bytes(b"\xff\x00{not json")
    (tmp_path / "huge.json").write_bytes(b" " * (70 * 1024))
    problems = {}
    for name in ("forged", "foreign", "garbage", "huge"):
        result = repo.conveyor(
            "audit", "verify", "--checkpoint", str(tmp_path / f"{name}.json"), "--json"
        )
        assert result.code == 1, (name, result.err)
        problems[name] = result.json()["checkpoints"][0]["problem"]
    assert "signature does not verify" in problems["forged"]
    assert "signed by another key" in problems["foreign"]
    assert "not valid JSON" in problems["garbage"]
    assert "larger than" in problems["huge"]
    # With the other instance's key pinned, its checkpoint names another record.
    other_key = tmp_path / "other.pub"
    other_key.write_text(other.conveyor("keys", "show").out)
    pinned = repo.conveyor(
        "audit",
        "verify",
        "--checkpoint",
        str(tmp_path / "foreign.json"),
        "--key",
        str(other_key),
        "--json",
    )
    assert pinned.code == 1
    assert "checkpoint of another record" in pinned.json()["checkpoints"][0]["problem"]
    missing = repo.conveyor("audit", "verify", "--checkpoint", str(tmp_path / "nope.json"))
    assert missing.code == 2 and "nope.json: cannot read it" in missing.err
    assert "Traceback" not in missing.err
    assert (
        "could not be checked"
        in repo.conveyor("audit", "verify", "--checkpoint", str(tmp_path / "garbage.json")).err
    )  # not "the record was altered": the file is bad
    # Anyone who can read the home can sign: a checkpoint beyond any event number is refused.
    from conveyor.adapters.signing import InstanceKey
    from conveyor.app.checkpoints import CHECKPOINT_TYPE

    key = InstanceKey.load_or_create(repo.path / ".conveyor" / "keys")
    huge = key.sign(CHECKPOINT_TYPE, json.dumps(dict(statement, seq=2**70)).encode())
    (tmp_path / "huge-seq.json").write_text(json.dumps(huge))
    result = repo.conveyor("audit", "verify", "--checkpoint", str(tmp_path / "huge-seq.json"))
    assert result.code == 1 and "'seq' is not an event number" in result.err
    assert "internal error" not in result.err


def test_a_record_without_events_has_nothing_to_checkpoint(repo: Repo) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("runs", "list").code == 0  # creates the record
    result = repo.conveyor("audit", "checkpoint")
    assert result.code == 1 and "nothing to checkpoint" in result.err
    assert result.out == ""


def test_a_checkpoint_needs_the_chain_up_to_its_event(repo: Repo, tmp_path: Path) -> None:
    """An event before the checkpoint's, altered without recomputing the hashes: the log does
    not verify, and neither does the checkpoint; nor is a new one made of an altered log."""
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    checkpoint = tmp_path / "checkpoint.json"
    assert repo.conveyor("audit", "checkpoint", "-o", str(checkpoint)).code == 0
    conn = sqlite3.connect(repo.path / ".conveyor" / "conveyor.db")
    conn.execute("DROP TRIGGER events_append_only_update")
    conn.execute(
        "UPDATE events SET payload = replace(payload, '\"run_id\"', '\"run_id\" ') WHERE seq = 2"
    )
    conn.commit()
    conn.close()
    result = repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint), "--json")
    assert result.code == 1
    check = result.json()["checkpoints"][0]
    assert (check["ok"], check["found"]) == (False, "altered")
    assert "event 2, which it vouches for, does not verify" in check["problem"]
    refused = repo.conveyor("audit", "checkpoint")
    assert refused.code == 1 and "a checkpoint would vouch for an altered record" in refused.err
    assert refused.out == ""


def test_the_keys_of_checkpoints_are_read_safely(repo: Repo, tmp_path: Path) -> None:
    """The home's key is as untrusted as the home: a deleted key is a finding (exit 1), a FIFO
    in its place does not block the check; --key alone is a usage error."""
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    checkpoint = tmp_path / "checkpoint.json"
    assert repo.conveyor("audit", "checkpoint", "-o", str(checkpoint)).code == 0
    public = repo.path / ".conveyor" / "keys" / "instance.pub"
    kept = tmp_path / "instance.pub"
    shutil.copy2(public, kept)
    public.unlink()
    os.mkfifo(public)
    blocked = repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint), timeout=20)
    assert blocked.code == 1 and "this home's public key" in blocked.err
    public.unlink()
    gone = repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint), "--json")
    assert gone.code == 1 and gone.json()["checkpoints"][0]["found"] == "invalid"
    pinned = repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint), "--key", str(kept))
    assert pinned.code == 0, pinned.err
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    odd = repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint), "--key", str(fifo))
    assert odd.code == 2 and "not a regular file" in odd.err
    alone = repo.conveyor("audit", "verify", "--key", str(kept))
    assert alone.code == 2 and "--checkpoint" in alone.err


def test_checkpoint_files_go_where_they_are_meant_to(repo: Repo, tmp_path: Path) -> None:
    """-o creates a new file: an existing one is replaced only with --force, a link is refused
    (the copy meant for elsewhere would stay here), so is anything but a regular file; a
    closed standard output is an error, not a success line."""
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    offbox = tmp_path / "offbox.json"
    offbox.write_text("old")
    exists = repo.conveyor("audit", "checkpoint", "-o", str(offbox))
    assert exists.code == 2 and "exists already" in exists.err and offbox.read_text() == "old"
    assert repo.conveyor("audit", "checkpoint", "-o", str(offbox), "--force").code == 0
    assert json.loads(offbox.read_text())["payloadType"]
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "victim.txt")
    refused = repo.conveyor("audit", "checkpoint", "-o", str(link), "--force")
    assert refused.code == 2 and "not a regular file" in refused.err
    assert not (tmp_path / "victim.txt").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused = repo.conveyor("audit", "checkpoint", "-o", str(fifo), timeout=20)
    assert refused.code == 2 and "not a regular file" in refused.err
    assert not fifo.is_file()
    closed = subprocess.run(
        [sys.executable, "-m", "conveyor", "audit", "checkpoint"],
        cwd=repo.path,
        env=repo.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        pass_fds=(),
        preexec_fn=lambda: os.close(1),
    )
    assert closed.returncode == 1, closed.stderr
    assert "cannot write the checkpoint to standard output" in closed.stderr
    assert "Traceback" not in closed.stderr and "checkpoint of event" not in closed.stderr


def test_a_directory_among_the_checkpoints_does_not_hide_a_finding(
    repo: Repo, tmp_path: Path
) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    good = tmp_path / "good.json"
    assert repo.conveyor("audit", "checkpoint", "-o", str(good)).code == 0
    rewrite_history(repo.path / ".conveyor", 2)
    (tmp_path / "folder").mkdir()
    result = repo.conveyor(
        "audit",
        "verify",
        "--checkpoint",
        str(good),
        "--checkpoint",
        str(tmp_path / "folder"),
        "--json",
    )
    assert result.code == 1  # the rewrite is the verdict; the folder is only unreadable
    assert [c["found"] for c in result.json()["checkpoints"]] == ["altered", "unreadable"]
    alone = repo.conveyor("audit", "verify", "--checkpoint", str(tmp_path / "folder"))
    assert alone.code == 2 and "not a regular file" in alone.err


def test_a_fifo_for_the_public_key_does_not_block_a_checkpoint(repo: Repo, tmp_path: Path) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    public = repo.path / ".conveyor" / "keys" / "instance.pub"
    assert repo.conveyor("keys", "show").code == 0
    public.unlink()
    os.mkfifo(public)
    made = repo.conveyor("audit", "checkpoint", "-o", str(tmp_path / "c.json"), timeout=20)
    assert made.code == 0, made.err
    assert public.is_file()  # the key's public half is written again
    assert repo.conveyor("audit", "verify", "--checkpoint", str(tmp_path / "c.json")).code == 0


# -- shipped by CONVEYOR_CHECKPOINT_COMMAND --------------------------------------------------


def shipping_to(folder: Path, **extra: str) -> dict[str, str]:
    folder.mkdir(exist_ok=True)
    return {
        "CONVEYOR_CHECKPOINT_COMMAND": f'cat > "{folder}/$CONVEYOR_CHECKPOINT_NAME"',
        **extra,
    }


def shipped(folder: Path) -> list[int]:
    """The event numbers of the checkpoints in ``folder``, in order."""
    return sorted(int(p.name.split("-")[2]) for p in folder.iterdir())


def test_commands_that_write_ship_a_checkpoint_and_readers_do_not(
    repo: Repo, tmp_path: Path
) -> None:
    repo.pipeline(SIMPLE)
    offbox = tmp_path / "offbox"
    env = shipping_to(offbox)
    first = repo.conveyor("run", env=env)
    assert first.code == 0, first.err
    events = repo.conveyor("audit", "verify", "--json").json()["events"]
    assert shipped(offbox) == [events] and first.err.count("warning") == 0
    (file,) = offbox.iterdir()  # named after the record (its first event's hash) and the event
    assert file.name.startswith("checkpoint-") and len(file.name.split("-")[1]) == 16
    counted = tmp_path / "count"
    counting = {
        "CONVEYOR_CHECKPOINT_COMMAND": f'echo x >> "{counted}"; cat > /dev/null',
    }
    (repo.path / ".conveyor" / "conveyor.db.shipped").unlink()  # as if never shipped
    for reader in (["runs", "list"], ["audit", "verify"], ["logs", "latest", "a"]):
        assert repo.conveyor(*reader, env=counting).code == 0
    assert not counted.exists()  # they wrote nothing: they ship nothing
    assert shipped(offbox) == [events]
    assert repo.conveyor("run", "--no-cache", env=env).code == 0
    later = repo.conveyor("audit", "verify", "--json").json()["events"]
    assert shipped(offbox) == [events, later]
    for checkpoint in offbox.iterdir():
        ok = repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint))
        assert ok.code == 0, ok.err
    mark = json.loads((repo.path / ".conveyor" / "conveyor.db.shipped").read_text())
    assert mark["seq"] == later
    told = repo.conveyor("audit", "verify", "--json").json()["last_shipped"]
    assert told == {
        "seq": later,
        "shipped_at": mark["shipped_at"],
        "held": True,
        "events_since": 0,
    }
    assert f"last checkpoint shipped: event {later} (" in repo.conveyor("audit", "verify").out

    rewrite_history(repo.path / ".conveyor", 2)  # both shipped checkpoints see it
    for checkpoint in offbox.iterdir():
        assert repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint)).code == 1
    # and no new checkpoint vouches for the rewritten log: it no longer holds the last one
    refused = repo.conveyor("run", "--no-cache", env=env)
    assert refused.code == 0  # the run's own outcome stands
    assert (
        f"warning: event {later} is not the one the record was verified up to before"
        " (conveyor.db.verified): the log was rewritten, or an older copy of it put back,"
        " since; no checkpoint is signed for it"
    ) in refused.err
    assert shipped(offbox) == [events, later]


def test_a_failed_or_slow_shipment_is_a_warning_and_the_next_command_ships(
    repo: Repo, tmp_path: Path
) -> None:
    repo.pipeline(SIMPLE)
    failing = {"CONVEYOR_CHECKPOINT_COMMAND": "echo 'backup host down' >&2; exit 3"}
    result = repo.conveyor("run", env=failing)
    assert result.code == 0
    assert (
        "warning: the checkpoint of event 6 was not shipped: CONVEYOR_CHECKPOINT_COMMAND exited"
        " with status 3: backup host down" in result.err
    )
    assert "hint: the next command that writes to the record ships one again" in result.err
    assert not (repo.path / ".conveyor" / "conveyor.db.shipped").exists()

    stuck = {
        "CONVEYOR_CHECKPOINT_COMMAND": "sleep 61.5 & sleep 61.5",
        "CONVEYOR_CHECKPOINT_TIMEOUT": "0.5",
    }
    result = repo.conveyor("run", "--no-cache", env=stuck, timeout=30)
    assert result.code == 0
    assert "CONVEYOR_CHECKPOINT_COMMAND did not finish within 0.5 s and was stopped" in result.err
    left = subprocess.run(["pgrep", "-f", "sleep 61.5"], capture_output=True, text=True)
    assert left.stdout.strip() == ""  # its whole process group was killed

    bad = repo.conveyor(
        "run",
        "--no-cache",
        env={**shipping_to(tmp_path / "o"), "CONVEYOR_CHECKPOINT_TIMEOUT": "soon"},
    )
    assert bad.code == 0 and "CONVEYOR_CHECKPOINT_TIMEOUT must be a number of seconds" in bad.err

    offbox = tmp_path / "offbox"
    assert repo.conveyor("run", "--no-cache", env=shipping_to(offbox)).code == 0
    events = repo.conveyor("audit", "verify", "--json").json()["events"]
    assert shipped(offbox) == [events]  # covers what the failed ones would have


@pytest.mark.slow
def test_audit_checkpoint_ship_ships_now(repo: Repo, tmp_path: Path) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0  # no command set: nothing shipped
    unset = repo.conveyor("audit", "checkpoint", "--ship")
    assert unset.code == 2 and "CONVEYOR_CHECKPOINT_COMMAND is not set" in unset.err
    offbox = tmp_path / "offbox"
    both = repo.conveyor("audit", "checkpoint", "--ship", "-o", str(tmp_path / "c.json"))
    assert both.code == 2 and "give one of them" in both.err
    failed = repo.conveyor(
        "audit", "checkpoint", "--ship", env={"CONVEYOR_CHECKPOINT_COMMAND": "exit 1"}
    )
    assert failed.code == 1 and "exited with status 1" in failed.err
    done = repo.conveyor("audit", "checkpoint", "--ship", env=shipping_to(offbox))
    assert done.code == 0, done.err
    assert "checkpoint of event 6 shipped as checkpoint-" in done.err
    (checkpoint,) = offbox.iterdir()
    checkpoint.unlink()  # lost off the machine: --ship ships it again (a run would not)
    assert repo.conveyor("runs", "list", env=shipping_to(offbox)).code == 0
    assert shipped(offbox) == []
    again = repo.conveyor("audit", "checkpoint", "--ship", env=shipping_to(offbox))
    assert again.code == 0 and "checkpoint of event 6 shipped as" in again.err
    assert shipped(offbox) == [6]
    assert repo.conveyor("audit", "verify", "--checkpoint", str(checkpoint)).code == 0
    force = repo.conveyor("audit", "checkpoint", "--force")
    assert force.code == 2 and "--force replaces the file -o writes" in force.err
    for timeout, code in (("0", 2), (".5", 0)):
        env = {**shipping_to(offbox), "CONVEYOR_CHECKPOINT_TIMEOUT": timeout}
        result = repo.conveyor("audit", "checkpoint", "--ship", env=env)
        assert result.code == code, result.err
        assert ("above 0 and at most 86400" in result.err) == (code == 2)


@pytest.mark.slow
def test_a_record_put_back_from_an_older_copy_is_not_signed_for(repo: Repo, tmp_path: Path) -> None:
    """The log no longer holds the event it was verified up to: an older copy was put back
    (what checkpoints exist to catch), even though the older copy verifies on its own."""
    repo.pipeline(SIMPLE)
    offbox = tmp_path / "offbox"
    env = shipping_to(offbox)
    assert repo.conveyor("run", env=env).code == 0
    home = repo.path / ".conveyor"
    backup = tmp_path / "backup"
    backup.mkdir()
    saved = ("conveyor.db", "conveyor.db-wal", "conveyor.db.head")  # a consistent copy
    for name in saved:
        shutil.copy2(home / name, backup / name)
    assert repo.conveyor("run", "--no-cache", env=env).code == 0
    assert shipped(offbox) == [6, 12]
    (home / "conveyor.db-shm").unlink(missing_ok=True)
    for name in saved:
        shutil.copy2(backup / name, home / name)
    told = repo.conveyor("audit", "verify", "--json")  # the chain verifies, but the home's
    assert told.code == 1  # own mark of the last checkpoint shipped names a later event
    doc = told.json()
    assert doc["problem"] is None and doc["last_shipped"]["held"] is False
    plain = repo.conveyor("audit", "verify")
    assert plain.code == 1
    assert "the record no longer holds event 12 as it was verified up to before" in plain.err
    manual = repo.conveyor("audit", "checkpoint", "-o", str(tmp_path / "manual.json"))
    assert manual.code == 1 and "the record ends before event 12" in manual.err
    assert not (tmp_path / "manual.json").exists()
    refused = repo.conveyor("audit", "checkpoint", "--ship", env=env)
    assert refused.code == 1
    assert "the record ends before event 12, which it was verified up to before" in refused.err
    assert "restored from a backup on purpose, delete conveyor.db.verified" in refused.err
    refused = repo.conveyor("run", "--no-cache", env=env)  # events 7..12 again, but others
    assert refused.code == 0
    assert "warning: event 12 is not the one the record was verified up to before" in refused.err
    assert shipped(offbox) == [6, 12]
    caught = repo.conveyor(
        "audit", "verify", "--checkpoint", str(offbox / sorted(p.name for p in offbox.iterdir())[0])
    )
    assert caught.code == 1  # the checkpoint of event 12 sees it
    (home / "conveyor.db.verified").unlink()  # the other mark still tells
    refused = repo.conveyor("audit", "checkpoint", "--ship", env=env)
    assert refused.code == 1
    assert "event 12 is not the one the last checkpoint shipped vouches for" in refused.err
    (home / "conveyor.db.shipped").unlink()
    assert repo.conveyor("audit", "checkpoint", "--ship", env=env).code == 0
    # Another history's event 12: a name of its own (the event's hash is in it), so the
    # proof of the lost one stays off the machine.
    assert shipped(offbox) == [6, 12, 12]
    assert (
        sum(
            repo.conveyor("audit", "verify", "--checkpoint", str(p)).code == 0
            for p in offbox.iterdir()
        )
        == 2
    )


def test_an_unreadable_verified_mark_means_the_whole_log_is_verified(
    repo: Repo, tmp_path: Path
) -> None:
    repo.pipeline(SIMPLE)
    offbox = tmp_path / "offbox"
    assert repo.conveyor("run", env=shipping_to(offbox)).code == 0
    mark = repo.path / ".conveyor" / "conveyor.db.verified"
    mark.write_text("{not json")
    conn = sqlite3.connect(repo.path / ".conveyor" / "conveyor.db")
    conn.execute("DROP TRIGGER events_append_only_update")
    conn.execute("UPDATE events SET payload = payload || ' ' WHERE seq = 2")
    conn.commit()
    conn.close()
    result = repo.conveyor("run", "--no-cache", env=shipping_to(offbox))
    assert (
        "warning: the event log does not verify (event 2 (stage.started) was altered" in result.err
    )
    assert shipped(offbox) == [6]


@pytest.mark.slow
def test_event_1_is_checked_by_every_checkpoint_and_the_whole_log_daily_and_on_demand(
    repo: Repo, tmp_path: Path
) -> None:
    """From the event verified last on, plus event 1 (it names the record and the file);
    the whole log on `--ship` and when its last whole check is a day old."""
    repo.pipeline(SIMPLE)
    offbox = tmp_path / "offbox"
    env = shipping_to(offbox)
    assert repo.conveyor("run", env=env).code == 0
    home = repo.path / ".conveyor"
    verified = json.loads((home / "conveyor.db.verified").read_text())
    assert verified["seq"] == 6 and verified["whole_at"] > 0

    conn = sqlite3.connect(home / "conveyor.db")
    conn.execute("DROP TRIGGER events_append_only_update")
    conn.execute("UPDATE events SET payload = payload || ' ' WHERE seq = 3")
    conn.commit()
    incremental = repo.conveyor("run", "--no-cache", env=env)
    assert incremental.code == 0 and "warning" not in incremental.err  # before the mark
    assert shipped(offbox) == [6, 12]
    whole = repo.conveyor("audit", "checkpoint", "--ship", env=env)
    assert whole.code == 1 and "event 3 (job.attempt.started) was altered" in whole.err
    stale = json.loads((home / "conveyor.db.verified").read_text())
    (home / "conveyor.db.verified").write_text(
        json.dumps({**stale, "whole_at": stale["whole_at"] - 25 * 3600})
    )
    daily = repo.conveyor("run", "--no-cache", env=env)
    assert "warning: the event log does not verify (event 3" in daily.err
    assert shipped(offbox) == [6, 12]

    conn.execute("UPDATE events SET payload = rtrim(payload) WHERE seq = 3")
    conn.execute("UPDATE events SET hash = ';rm -rf x;#' || substr(hash, 12) WHERE seq = 1")
    conn.commit()
    conn.close()
    first = repo.conveyor("run", "--no-cache", env=env)
    assert "warning: the event log does not verify (event 1 " in first.err
    assert shipped(offbox) == [6, 12]
    assert all(p.name[11:27].isalnum() for p in offbox.iterdir())


def test_the_shipping_command_runs_outside_the_hooks_repository_and_not_after_a_cancel(
    repo: Repo, tmp_path: Path
) -> None:
    """As jobs: a hook's GIT_DIR is not the shipping command's (its git would commit into the
    user's repository). A cancelled command ends at once: the next one ships."""
    repo.pipeline(SIMPLE)
    offbox = tmp_path / "offbox"
    seen = tmp_path / "env.txt"
    env = {
        "CONVEYOR_CHECKPOINT_COMMAND": (
            f'env > "{seen}"; cat > "{offbox}/$CONVEYOR_CHECKPOINT_NAME"'
        ),
        "GIT_DIR": str(repo.path / ".git"),
    }
    offbox.mkdir()
    assert repo.conveyor("run", env=env).code == 0
    assert shipped(offbox) == [6]
    assert not any(line.startswith("GIT_DIR=") for line in seen.read_text().splitlines())

    repo.pipeline(
        "pipeline: simple\nstages:\n  - name: only\n    jobs:\n"
        "      a: {run: 'echo $$ > ../a.pid; sleep 60'}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "run"],
        cwd=repo.path,
        env={**repo.env, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    pid_file = repo.path / ".conveyor" / "workspaces" / "a.pid"
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert b"no checkpoint shipped (the command was cancelled)" in err
    assert shipped(offbox) == [6]
    assert repo.conveyor("runs", "list", env=env).code == 0  # reads only: ships nothing
    assert shipped(offbox) == [6]


def test_a_shipment_the_home_cannot_remember_is_said(repo: Repo, tmp_path: Path) -> None:
    repo.pipeline(SIMPLE)
    assert repo.conveyor("run").code == 0
    home = repo.path / ".conveyor"
    (home / "conveyor.db.shipped").mkdir()  # cannot be replaced by a file
    offbox = tmp_path / "offbox"
    result = repo.conveyor("audit", "checkpoint", "--ship", env=shipping_to(offbox))
    assert result.code == 1
    assert "was shipped as checkpoint-" in result.err and "cannot be written" in result.err
    assert shipped(offbox) == [6]
    assert not [p for p in home.iterdir() if p.name.endswith(".tmp")]


def test_started_with_sigchld_ignored_a_run_still_knows_its_jobs_exit_codes(
    repo: Repo, tmp_path: Path
) -> None:
    """Some launchers leave SIGCHLD ignored: children would be reaped unseen."""
    repo.pipeline(
        "pipeline: simple\nstages:\n  - name: only\n    jobs:\n      a: {run: 'exit 3'}\n"
    )
    offbox = tmp_path / "offbox"
    launcher = (
        "import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN);"
        " os.execv(sys.executable, [sys.executable, '-m', 'conveyor', 'run'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", launcher],
        cwd=repo.path,
        env={**repo.env, **shipping_to(offbox)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "internal error" not in proc.stderr
    assert repo.jobs()["a"]["exit_code"] == 3
    assert len(shipped(offbox)) == 1


def test_audit_verify_tells_a_rollback_the_verified_mark_sees(repo: Repo, tmp_path: Path) -> None:
    """Shipping failed after the last verification: only conveyor.db.verified names the lost
    events; an unreadable --checkpoint does not hide it."""
    repo.pipeline(SIMPLE)
    offbox = tmp_path / "offbox"
    assert repo.conveyor("run", env=shipping_to(offbox)).code == 0
    home = repo.path / ".conveyor"
    backup = tmp_path / "backup"
    backup.mkdir()
    saved = ("conveyor.db", "conveyor.db-wal", "conveyor.db.head")
    for name in saved:
        shutil.copy2(home / name, backup / name)
    failing = {"CONVEYOR_CHECKPOINT_COMMAND": "exit 3"}
    assert repo.conveyor("run", "--no-cache", env=failing).code == 0  # verified 12, shipped 6
    (home / "conveyor.db-shm").unlink(missing_ok=True)
    for name in saved:
        shutil.copy2(backup / name, home / name)
    told = repo.conveyor("audit", "verify")
    assert told.code == 1
    assert "the record no longer holds event 12 as it was verified up to before" in told.err
    doc = repo.conveyor("audit", "verify", "--json").json()
    assert doc["ok"] is False and "event 12" in doc["marks_problem"]
    assert doc["last_shipped"]["held"] is True
    hidden = repo.conveyor("audit", "verify", "--checkpoint", str(tmp_path / "none.json"))
    assert hidden.code == 1 and "no longer holds event 12" in hidden.err
