"""Signed build provenance: statements, DSSE envelopes, the instance key.

Our envelopes are also checked by independent implementations: securesystemslib's DSSE
``Envelope`` (the reference implementation in-toto uses) and a PAE written out by hand here.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib import exceptions as sslib_exceptions
from securesystemslib.dsse import Envelope
from securesystemslib.signer import (  # type: ignore[attr-defined]  # public, no __all__
    CryptoSigner,
    SSlibKey,
)

from conveyor.adapters import signing
from conveyor.adapters.signing import (
    InstanceKey,
    SigningKeyError,
    key_id,
    load_public_key,
    verify_envelope,
)
from conveyor.domain import provenance as prov
from conveyor.domain.provenance import (
    BUILD_TYPE,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    build_statement,
    builder_id_for,
    check_statement,
    pae,
    statement_bytes,
    subject_digest,
)
from conveyor.errors import ConveyorError, VerificationError

HEX_A = "a" * 64
HEX_B = "b" * 64
HEX_C = "c" * 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def args(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "app",
        "digest": "sha256:" + HEX_A,
        "builder_id": builder_id_for("f" * 64),
        "repository": "git+https://example.com/shop.git",
        "revision": COMMIT,
        "pipeline_file": "conveyor.yml",
        "pipeline_digest": "sha256:" + HEX_B,
        "stage": "build",
        "job": "package",
        "parameters": {"run": "make dist", "env": {"MODE": "release"}},
        "dependencies": [
            {"name": "wheels", "digest": "sha256:" + HEX_C},
            {"name": "assets", "digest": "sha256:" + HEX_B, "kind": "dir"},
        ],
        "run_id": 42,
        "started_at": "2026-01-31T12:00:00.000001Z",
        "finished_at": "2026-01-31T12:00:09.500000Z",
        "conveyor_version": "0.1.0",
    }
    base.update(changes)
    return base


def statement(**changes: Any) -> dict[str, Any]:
    return build_statement(**args(**changes))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def envelope_with_payload(envelope: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return {**envelope, "payload": b64(payload)}


# --- statements ---------------------------------------------------------------------------


def test_statement_follows_in_toto_v1_and_slsa_v1() -> None:
    st = statement()
    assert set(st) == {"_type", "subject", "predicateType", "predicate"}
    assert st["_type"] == STATEMENT_TYPE == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == PREDICATE_TYPE == "https://slsa.dev/provenance/v1"
    assert st["subject"] == [{"name": "app", "digest": {"sha256": HEX_A}}]
    assert set(st["predicate"]) == {"buildDefinition", "runDetails"}
    definition = st["predicate"]["buildDefinition"]
    assert set(definition) == {
        "buildType",
        "externalParameters",
        "internalParameters",
        "resolvedDependencies",
    }
    assert definition["buildType"] == BUILD_TYPE
    assert definition["externalParameters"] == {
        "repository": "git+https://example.com/shop.git",
        "revision": COMMIT,
        "pipeline": {"path": "conveyor.yml", "digest": {"sha256": HEX_B}},
        "stage": "build",
        "job": "package",
        "parameters": {"run": "make dist", "env": {"MODE": "release"}},
    }
    assert definition["internalParameters"] == {}
    assert definition["resolvedDependencies"] == [
        {"uri": "git+https://example.com/shop.git", "digest": {"gitCommit": COMMIT}},
        {"name": "assets", "digest": {"sha256": HEX_B}},
        {"name": "wheels", "digest": {"sha256": HEX_C}},
    ]
    assert st["predicate"]["runDetails"] == {
        "builder": {"id": "https://conveyor.dev/builders/ed25519/" + "f" * 64,
                    "version": {"conveyor": "0.1.0"}},
        "metadata": {
            "invocationId": "42",
            "startedOn": "2026-01-31T12:00:00.000001Z",
            "finishedOn": "2026-01-31T12:00:09.500000Z",
        },
    }  # fmt: skip


def test_statement_readers() -> None:
    st = check_statement(statement(internal_parameters={"dirty": False}))
    assert subject_digest(st) == "sha256:" + HEX_A
    assert prov.subject_name(st) == "app"
    assert prov.builder_id(st) == builder_id_for("f" * 64)
    assert prov.invocation_id(st) == "42"
    assert prov.source_revision(st) == COMMIT
    assert st["predicate"]["buildDefinition"]["internalParameters"] == {"dirty": False}


def test_canonical_bytes_are_deterministic() -> None:
    one = statement()
    two = statement(
        parameters={"env": {"MODE": "release"}, "run": "make dist"},
        dependencies=list(reversed(args()["dependencies"])),
    )
    assert statement_bytes(one) == statement_bytes(two)
    data = statement_bytes(one)
    assert data == json.dumps(one, sort_keys=True, separators=(",", ":")).encode()
    assert b" " not in data.replace(b"make dist", b"")
    assert json.loads(data) == one
    assert "é".encode() in statement_bytes(statement(job="café"))  # UTF-8, not \u escapes


def test_statement_does_not_share_the_callers_parameters() -> None:
    parameters: dict[str, Any] = {"env": {"A": "1"}}
    st = statement(parameters=parameters)
    parameters["env"]["A"] = "2"
    assert st["predicate"]["buildDefinition"]["externalParameters"]["parameters"] == {
        "env": {"A": "1"}
    }


@pytest.mark.parametrize(
    "changes",
    [
        {"digest": HEX_A},
        {"digest": "sha256:" + HEX_A.upper()},
        {"digest": "sha512:" + HEX_A},
        {"pipeline_digest": "sha256:xyz"},
        {"revision": "main"},
        {"revision": COMMIT[:12]},
        {"started_at": "2026-01-31 12:00:00"},
        {"finished_at": "2026-01-31T12:00:00+01:00"},
        {"finished_at": "2026-02-30T12:00:00Z"},
        {"parameters": {"when": object()}},
        {"parameters": {"ratio": float("nan")}},
        {"dependencies": [{"name": "x", "digest": "md5:abc"}]},
        {"dependencies": [{"digest": "sha256:" + HEX_A}]},
        {"name": ""},
        {"builder_id": ""},
    ],
)
def test_malformed_arguments_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        statement(**changes)


def test_pae_matches_the_dsse_spec_example() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("", b"") == b"DSSEv1 0  0 "
    assert pae("tÿpe", b"\x00\xff") == b"DSSEv1 5 t\xc3\xbfpe 2 \x00\xff"  # lengths in bytes


@pytest.mark.parametrize("payload", [b"", b"hello world", "ünïcode".encode(), bytes(range(256))])
def test_pae_agrees_with_securesystemslib(payload: bytes) -> None:
    assert pae(PAYLOAD_TYPE, payload) == Envelope(payload, PAYLOAD_TYPE, {}).pae()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"),
        lambda s: s.update(predicateType="https://slsa.dev/provenance/v0.2"),
        lambda s: s.update(subject=[]),
        lambda s: s.update(subject=[s["subject"][0], s["subject"][0]]),
        lambda s: s["subject"][0].update(digest={"sha1": "0" * 40}),
        lambda s: s["subject"][0].update(name=7),
        lambda s: s["predicate"]["runDetails"].pop("builder"),
        lambda s: s.pop("predicate"),
    ],
)
def test_check_statement_refuses_other_shapes(mutate: Any) -> None:
    st = statement()
    mutate(st)
    with pytest.raises(ValueError):
        check_statement(st)


def test_check_statement_refuses_non_objects() -> None:
    values: list[object] = [None, [], "statement", 1]
    for value in values:
        with pytest.raises(ValueError):
            check_statement(value)


# --- envelopes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> InstanceKey:
    return InstanceKey.generate()


@pytest.fixture(scope="module")
def other() -> InstanceKey:
    return InstanceKey.generate()


def test_envelope_shape(key: InstanceKey) -> None:
    st = statement(builder_id=key.builder_id)
    env = key.sign_statement(st)
    assert set(env) == {"payload", "payloadType", "signatures"}
    assert env["payloadType"] == "application/vnd.in-toto+json"
    assert base64.b64decode(env["payload"], validate=True) == statement_bytes(st)
    [sig] = env["signatures"]
    assert set(sig) == {"keyid", "sig"}
    assert len(base64.b64decode(sig["sig"], validate=True)) == 64
    der = load_public_key(key.public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert sig["keyid"] == key.keyid == hashlib.sha256(der).hexdigest()
    assert key.builder_id == "https://conveyor.dev/builders/ed25519/" + key.keyid
    assert key.public_pem.startswith("-----BEGIN PUBLIC KEY-----\n")


def test_sign_then_verify(key: InstanceKey) -> None:
    st = statement(builder_id=key.builder_id)
    env = key.sign_statement(st)
    assert verify_envelope(env, key.public_pem) == st
    assert verify_envelope(json.dumps(env), key.public_pem) == st
    assert verify_envelope(json.dumps(env).encode(), key.public_pem.encode()) == st


def test_keyid_is_only_a_hint(key: InstanceKey) -> None:
    env = key.sign_statement(statement())
    for hint in ({}, {"keyid": ""}, {"keyid": None}):
        unhinted = {**env, "signatures": [{"sig": env["signatures"][0]["sig"], **hint}]}
        assert verify_envelope(unhinted, key.public_pem) == statement()


def test_one_good_signature_among_others_is_enough(key: InstanceKey, other: InstanceKey) -> None:
    env = key.sign_statement(statement())
    foreign = other.sign_statement(statement())["signatures"]
    both = {**env, "signatures": [*foreign, *env["signatures"]]}
    assert verify_envelope(both, key.public_pem) == statement()
    assert verify_envelope(both, other.public_pem) == statement()


def test_url_safe_and_unpadded_base64_are_accepted(key: InstanceKey) -> None:
    """DSSE verifiers must accept standard and URL-safe base64."""
    st = statement(job="jöb ~~~ ???")  # bytes that encode to '+' or '/' in standard base64
    env = key.sign_statement(st)
    raw = base64.b64decode(env["payload"])
    sig = base64.b64decode(env["signatures"][0]["sig"])
    url = {
        **env,
        "payload": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "signatures": [{"keyid": key.keyid, "sig": base64.urlsafe_b64encode(sig).decode()}],
    }
    assert verify_envelope(url, key.public_pem) == st


def test_tampered_payload_is_refused(key: InstanceKey) -> None:
    env = key.sign_statement(statement())
    forged = envelope_with_payload(env, statement_bytes(statement(digest="sha256:" + HEX_C)))
    with pytest.raises(VerificationError, match=f"does not verify with key {key.keyid}"):
        verify_envelope(forged, key.public_pem)


def test_tampered_signature_is_refused(key: InstanceKey) -> None:
    env = key.sign_statement(statement())
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[10] ^= 1
    forged = {**env, "signatures": [{"keyid": key.keyid, "sig": b64(bytes(sig))}]}
    with pytest.raises(VerificationError, match="altered or signed by another key"):
        verify_envelope(forged, key.public_pem)
    short = {**env, "signatures": [{"keyid": key.keyid, "sig": b64(bytes(sig[:32]))}]}
    with pytest.raises(VerificationError, match="does not verify"):
        verify_envelope(short, key.public_pem)


def test_other_key_is_refused(key: InstanceKey, other: InstanceKey) -> None:
    env = key.sign_statement(statement())
    with pytest.raises(VerificationError, match=f"no signature by key {other.keyid}"):
        verify_envelope(env, other.public_pem)
    unhinted = {**env, "signatures": [{"sig": env["signatures"][0]["sig"]}]}
    with pytest.raises(VerificationError, match="does not verify"):
        verify_envelope(unhinted, other.public_pem)
    claimed = {**env, "signatures": [{"keyid": other.keyid, "sig": env["signatures"][0]["sig"]}]}
    with pytest.raises(VerificationError, match="does not verify"):
        verify_envelope(claimed, other.public_pem)


def test_payload_type_is_authenticated(key: InstanceKey) -> None:
    env = key.sign_statement(statement())
    relabelled = {**env, "payloadType": "application/vnd.other+json"}
    with pytest.raises(VerificationError, match="payloadType"):
        verify_envelope(relabelled, key.public_pem)
    with pytest.raises(VerificationError, match="does not verify"):
        verify_envelope(relabelled, key.public_pem, payload_type="application/vnd.other+json")
    signed_as_other = key.sign("application/vnd.other+json", statement_bytes(statement()))
    with pytest.raises(VerificationError, match="payloadType"):
        verify_envelope(signed_as_other, key.public_pem)


def test_signed_payload_must_be_a_provenance_statement(key: InstanceKey) -> None:
    for payload in (b"not json", b"[]", b'{"a":1,"a":2}', json.dumps({"_type": "x"}).encode()):
        with pytest.raises(VerificationError, match="not a SLSA v1 provenance statement"):
            verify_envelope(key.sign(PAYLOAD_TYPE, payload), key.public_pem)


def _good() -> dict[str, Any]:
    return InstanceKey.generate().sign_statement(statement())


GARBAGE: list[Any] = [
    b"",
    b"not json",
    "{",
    b"\xff\xfe{}",
    "[]",
    "null",
    '"envelope"',
    "{}",
    "[" * 100_000,
    '{"payload": NaN}',
    '{"payloadType": "a", "payloadType": "b", "payload": "", "signatures": []}',
    {"payloadType": PAYLOAD_TYPE, "signatures": [{"sig": "AA=="}]},
    {"payload": "", "signatures": [{"sig": "AA=="}]},
    {"payload": "", "payloadType": PAYLOAD_TYPE},
    {"payload": 1, "payloadType": PAYLOAD_TYPE, "signatures": [{"sig": "AA=="}]},
    {"payload": "", "payloadType": 1, "signatures": [{"sig": "AA=="}]},
    {"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": []},
    {"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": {"sig": "AA=="}},
    {"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": ["AA=="]},
    {"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": [{"keyid": "k"}]},
    {"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": [{"sig": 5}]},
    {"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": [{"sig": "AA==", "keyid": 3}]},
    {"payload": "%%%", "payloadType": PAYLOAD_TYPE, "signatures": [{"sig": "AA=="}]},
    {"payload": "a+b_", "payloadType": PAYLOAD_TYPE, "signatures": [{"sig": "AA=="}]},
    {"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": [{"sig": "A"}]},
    {"payload": "", "payloadType": PAYLOAD_TYPE, "signatures": [{"sig": "AA=="}] * 17},
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_refused_with_a_reason(garbage: Any, key: InstanceKey) -> None:
    with pytest.raises(VerificationError) as caught:
        verify_envelope(garbage, key.public_pem)
    assert caught.value.message


def test_garbage_around_a_good_envelope_is_refused(key: InstanceKey) -> None:
    env = key.sign_statement(statement())
    bad_payload = {**env, "payload": env["payload"][:-3] + "*=="}
    bad_sig = {**env, "signatures": [{"keyid": key.keyid, "sig": "not base64!"}]}
    for forged in (bad_payload, bad_sig):
        with pytest.raises(VerificationError, match="base64"):
            verify_envelope(forged, key.public_pem)
    with pytest.raises(VerificationError, match="larger than"):
        verify_envelope(b" " * (signing.MAX_ENVELOPE_BYTES + 1), key.public_pem)


def test_a_bad_public_key_is_refused(key: InstanceKey) -> None:
    env = key.sign_statement(statement())
    ed448 = (
        Ed448PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for pem in ("", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", ed448):
        with pytest.raises(VerificationError, match="not a PEM Ed25519 public key"):
            verify_envelope(env, pem)


# --- independent implementations -----------------------------------------------------------


def _sslib_key(public_pem: str, keyid: str) -> SSlibKey:
    public = serialization.load_pem_public_key(public_pem.encode())
    assert isinstance(public, Ed25519PublicKey)
    return SSlibKey.from_crypto(public, keyid=keyid)


def test_securesystemslib_verifies_our_envelopes(key: InstanceKey, other: InstanceKey) -> None:
    st = statement()
    env = key.sign_statement(st)
    parsed = Envelope.from_dict(copy.deepcopy(env))  # from_dict changes its argument
    accepted = parsed.verify([_sslib_key(key.public_pem, key.keyid)], 1)
    assert list(accepted) == [key.keyid]
    assert parsed.payload_type == PAYLOAD_TYPE
    assert json.loads(parsed.payload) == st
    forged = envelope_with_payload(env, statement_bytes(statement(job="other")))
    with pytest.raises(sslib_exceptions.VerificationError):
        Envelope.from_dict(copy.deepcopy(forged)).verify([_sslib_key(key.public_pem, key.keyid)], 1)
    with pytest.raises(sslib_exceptions.VerificationError):
        Envelope.from_dict(copy.deepcopy(env)).verify([_sslib_key(other.public_pem, key.keyid)], 1)


def test_we_verify_securesystemslib_envelopes() -> None:
    private = Ed25519PrivateKey.generate()
    ours = InstanceKey(private)
    signer = CryptoSigner(private, _sslib_key(ours.public_pem, ours.keyid))
    st = statement()
    env = Envelope(statement_bytes(st), PAYLOAD_TYPE, {})
    env.sign(signer)
    assert verify_envelope(env.to_dict(), ours.public_pem) == st
    assert ours.sign_statement(st) == env.to_dict()  # Ed25519 is deterministic: same bytes


def test_hand_written_pae_verifies_our_signature(key: InstanceKey) -> None:
    env = key.sign_statement(statement())
    body = base64.b64decode(env["payload"])
    kind = env["payloadType"].encode()
    message = b"DSSEv1 " + str(len(kind)).encode() + b" " + kind
    message += b" " + str(len(body)).encode() + b" " + body
    public = load_public_key(key.public_pem)
    public.verify(base64.b64decode(env["signatures"][0]["sig"]), message)  # raises if invalid


# --- the instance key file ------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_files_are_created_private(tmp_path: Path) -> None:
    directory = tmp_path / "home" / "keys"
    key = InstanceKey.load_or_create(directory)
    assert key.path == directory / "instance.key"
    assert mode(directory) == 0o700
    assert mode(directory / "instance.key") == 0o600
    assert mode(directory / "instance.pub") == 0o644
    assert (directory / "instance.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert (directory / "instance.pub").read_text() == key.public_pem
    assert sorted(p.name for p in directory.iterdir()) == ["instance.key", "instance.pub"]
    again = InstanceKey.load_or_create(directory)
    assert again.keyid == key.keyid
    assert verify_envelope(key.sign_statement(statement()), again.public_pem) == statement()


def test_an_open_key_directory_is_restricted(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    InstanceKey.load_or_create(tmp_path)
    assert mode(tmp_path) == 0o700


def test_public_key_file_follows_the_private_key(tmp_path: Path) -> None:
    key = InstanceKey.load_or_create(tmp_path)
    (tmp_path / "instance.pub").write_text(InstanceKey.generate().public_pem)
    InstanceKey.load_or_create(tmp_path)
    assert (tmp_path / "instance.pub").read_text() == key.public_pem


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_key_others_can_access_is_refused(tmp_path: Path, bad_mode: int) -> None:
    InstanceKey.load_or_create(tmp_path)
    path = tmp_path / "instance.key"
    path.chmod(bad_mode)
    with pytest.raises(SigningKeyError) as caught:
        InstanceKey.load_or_create(tmp_path)
    error = caught.value
    assert isinstance(error, ConveyorError)
    assert f"has mode {bad_mode:04o}; it must be readable only by its owner" in error.message
    assert error.hint == f"chmod 600 {path}"
    assert mode(path) == bad_mode  # reported, not silently changed


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        Ed448PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    ],
    ids=["empty", "garbage", "ed448", "encrypted"],
)
def test_a_key_file_without_an_ed25519_key_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "instance.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(SigningKeyError, match="not an unencrypted PKCS#8 PEM Ed25519"):
        InstanceKey.load_or_create(tmp_path)


def test_a_key_path_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "instance.key").mkdir(mode=0o700)
    with pytest.raises(SigningKeyError):
        InstanceKey.load_or_create(tmp_path)


def test_losing_the_creation_race_uses_the_winners_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner = Ed25519PrivateKey.generate()
    real_link = os.link

    def link_after_the_winner(src: str, dst: str) -> None:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(
                winner.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_the_winner)
    key = InstanceKey.load_or_create(tmp_path)
    assert key.keyid == key_id(winner.public_key())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instance.key", "instance.pub"]


CREATE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from conveyor.adapters.signing import InstanceKey
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.001)
    print(InstanceKey.load_or_create(Path(sys.argv[1])).keyid)
    """
)


def test_concurrent_creation_ends_with_one_key(tmp_path: Path) -> None:
    directory, go = tmp_path / "keys", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE, str(directory), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(0.5)  # let every process import and wait at the gate
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    keyids = {out.strip() for out, _ in results}
    assert len(keyids) == 1
    assert keyids == {InstanceKey.load_or_create(directory).keyid}
    assert sorted(p.name for p in directory.iterdir()) == ["instance.key", "instance.pub"]
