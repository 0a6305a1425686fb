"""The instance's Ed25519 signing key, and DSSE envelopes of provenance statements.

Each Conveyor instance has one key, made on first use: ``instance.key`` (PKCS#8 PEM, mode 0600,
in a 0700 directory) and ``instance.pub`` (SubjectPublicKeyInfo PEM, to hand to verifiers). Its
id is the hex sha256 of the DER SubjectPublicKeyInfo, and the instance's SLSA builder id is
``builder_id_for(keyid)``. A key file that others can read or that another user owns is refused,
as ssh does. Two processes creating the key at once end with one key: each writes a private temp
file and *links* it into place, which fails if the name exists, so the loser reads the winner's
complete key and no process ever sees a partial file.

Envelopes follow DSSE v1 (https://github.com/secure-systems-lab/dsse): the signature covers
``PAE(payloadType, payload)`` and the JSON envelope is ``{"payload", "payloadType",
"signatures": [{"keyid", "sig"}]}`` with standard, padded base64.

Library choice: Ed25519 comes from ``cryptography``; the DSSE layer is written here (PAE is in
``conveyor.domain.provenance``) rather than taken from ``securesystemslib.dsse``, because that
``Envelope`` does not fit verification of hostile input: ``from_dict`` mutates its argument and
fails with assorted ``KeyError``/``TypeError``/``binascii.Error``s, signatures without a
``keyid`` (optional in DSSE) cannot be represented, and ``verify`` reports only a threshold
count, not which check failed. Signing with it would then be a second DSSE code path for no gain.
The tests verify our envelopes with securesystemslib, and its envelopes with ``verify_envelope``,
so both implementations are held to agree.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from conveyor.domain.provenance import (
    PAYLOAD_TYPE,
    builder_id_for,
    check_statement,
    loads_strict,
    pae,
    statement_bytes,
)
from conveyor.domain.text import inline
from conveyor.errors import ConveyorError, VerificationError

KEY_FILE = "instance.key"
PUBLIC_KEY_FILE = "instance.pub"
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
"""Larger envelopes are refused unread; provenance is a few kilobytes."""
MAX_SIGNATURES = 16


class SigningKeyError(ConveyorError):
    """The instance's signing key cannot be created, read or trusted."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex sha256 of the key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64 (DSSE verifiers must accept both), padding optional."""
    if "-" in text or "_" in text:
        if "+" in text or "/" in text:
            raise ValueError("it mixes the standard and URL-safe alphabets")
        text = text.translate(str.maketrans("-_", "+/"))
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from None


class InstanceKey:
    """An Ed25519 private key that signs this instance's provenance."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._private_key = private_key
        self.path = path
        """The key file, or ``None`` for a key that lives only in memory."""
        self._public_key = private_key.public_key()
        self.keyid = key_id(self._public_key)
        """Hex sha256 of the DER SubjectPublicKeyInfo."""

    @classmethod
    def generate(cls) -> InstanceKey:
        """A new key kept only in memory (tests, one-off signing)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, directory: Path) -> InstanceKey:
        """The key in ``directory/instance.key``, created (with ``instance.pub``) if missing.

        Raises:
            SigningKeyError: the directory or key file cannot be used, the key file is readable
                by others or owned by another user, or it does not hold an Ed25519 key.
        """
        _prepare_directory(directory)
        path = directory / KEY_FILE
        try:
            key = _read_private_key(path)
        except FileNotFoundError:
            key = _create_private_key(path)
        instance = cls(key, path)
        instance._write_public_key(directory / PUBLIC_KEY_FILE)
        return instance

    @property
    def public_pem(self) -> str:
        """The public key as SubjectPublicKeyInfo PEM."""
        pem = self._public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode("ascii")

    @property
    def builder_id(self) -> str:
        """This instance's SLSA builder id (``builder_id_for(keyid)``)."""
        return builder_id_for(self.keyid)

    def sign(self, payload_type: str, payload: bytes) -> dict[str, Any]:
        """A DSSE envelope of ``payload``, signed over ``PAE(payload_type, payload)``."""
        signature = self._private_key.sign(pae(payload_type, payload))
        return {
            "payload": _b64encode(payload),
            "payloadType": payload_type,
            "signatures": [{"keyid": self.keyid, "sig": _b64encode(signature)}],
        }

    def sign_statement(self, statement: Mapping[str, Any]) -> dict[str, Any]:
        """A DSSE envelope of the statement's canonical bytes, as in-toto JSON."""
        return self.sign(PAYLOAD_TYPE, statement_bytes(statement))

    def _write_public_key(self, path: Path) -> None:
        data = self.public_pem.encode("ascii")
        try:
            if _same_regular_file(path, data):
                return
            _write_atomically(path, data, 0o644)
        except OSError as exc:
            raise SigningKeyError(f"cannot write the public key {path}: {_reason(exc)}") from exc


def _same_regular_file(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a regular file holding ``data`` (read without blocking on a FIFO,
    and no further than ``data``'s length: the home is untrusted)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(len(data) + 1) == data
    except OSError:
        return False
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _prepare_directory(directory: Path) -> None:
    """Create ``directory`` as 0700, or restrict it to its owner if it exists."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise SigningKeyError(f"the key directory {directory} is not a directory")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(directory, 0o700)
    except OSError as exc:
        raise SigningKeyError(
            f"cannot prepare the key directory {directory}: {_reason(exc)}"
        ) from exc


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (mode ``mode``) so readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_private_key(path: Path) -> Ed25519PrivateKey:
    """Write a new key to ``path`` unless another process did first; the key at ``path``.

    The key goes to a 0600 temp file (``mkstemp`` creates it with O_EXCL and mode 0600), then
    ``os.link`` publishes it under ``path`` only if no file has that name, atomically.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return _read_private_key(path)  # another process won the race: use its key
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _fsync_directory(path.parent)
    except OSError as exc:
        raise SigningKeyError(f"cannot create the signing key {path}: {_reason(exc)}") from exc
    return key


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key in ``path``, after checking the file's type, mode and owner.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        SigningKeyError: anything else is wrong.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # a FIFO must not block
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key {path}: {_reason(exc)}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SigningKeyError(f"the signing key {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise SigningKeyError(
                f"the signing key {path} has mode {mode:04o}; it must be readable only by its"
                " owner",
                hint=f"chmod 600 {path}",
            )
        if st.st_uid not in (os.geteuid(), 0):
            raise SigningKeyError(
                f"the signing key {path} belongs to another user (uid {st.st_uid})",
                hint="make a new key: move the file away and run again",
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_KEY_FILE_BYTES and (chunk := os.read(fd, MAX_KEY_FILE_BYTES + 1)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key {path}: {_reason(exc)}") from exc
    finally:
        os.close(fd)
    problem = f"the signing key {path} is not an unencrypted PKCS#8 PEM Ed25519 private key"
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SigningKeyError(problem)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningKeyError(problem) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(problem)
    return key


def load_public_key(public_pem: str | bytes) -> Ed25519PublicKey:
    """The Ed25519 public key in ``public_pem`` (SubjectPublicKeyInfo PEM).

    Raises:
        VerificationError: it is not one.
    """
    data = public_pem.encode("utf-8") if isinstance(public_pem, str) else public_pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise VerificationError("the public key is not a PEM Ed25519 public key")
    return key


def verify_envelope(
    envelope: Mapping[str, Any] | bytes | str,
    public_pem: str | bytes,
    *,
    payload_type: str = PAYLOAD_TYPE,
) -> dict[str, Any]:
    """The provenance statement in a DSSE ``envelope`` signed by the key ``public_pem``.

    ``envelope`` is untrusted (see ``open_envelope``). The payload must be a SLSA v1 provenance
    statement (``check_statement``). The caller still decides whether the statement's subject
    and builder are the expected ones.

    Raises:
        VerificationError: saying which check failed.
    """
    payload = open_envelope(envelope, public_pem, payload_type=payload_type)
    try:
        return check_statement(loads_strict(payload))
    except ValueError as exc:
        raise VerificationError(
            f"the signed payload is not a SLSA v1 provenance statement: {exc}"
        ) from None


def open_envelope(
    envelope: Mapping[str, Any] | bytes | str,
    public_pem: str | bytes,
    *,
    payload_type: str,
    what: str = "provenance",
) -> bytes:
    """The payload of a DSSE ``envelope`` of ``payload_type`` signed by the key ``public_pem``.

    ``envelope`` is untrusted: the JSON text or its parsed object. A signature is tried when its
    ``keyid`` is this key's id or is unset (``keyid`` is an unauthenticated hint); one valid
    signature is enough. The payload is returned only once its signature verifies; ``what``
    names the envelope in errors.

    Raises:
        VerificationError: saying which check failed.
    """
    key = load_public_key(public_pem)
    keyid = key_id(key)
    if isinstance(envelope, bytes | str):
        if len(envelope) > MAX_ENVELOPE_BYTES:
            raise VerificationError(
                f"the {what} envelope is larger than {MAX_ENVELOPE_BYTES} bytes"
            )
        try:
            envelope = loads_strict(envelope)
        except ValueError as exc:
            raise VerificationError(f"the {what} envelope is not valid JSON: {exc}") from None
    if not isinstance(envelope, Mapping):
        raise VerificationError(f"the {what} envelope is not a JSON object")

    found_type = envelope.get("payloadType")
    encoded = envelope.get("payload")
    signatures = envelope.get("signatures")
    if not isinstance(found_type, str):
        raise VerificationError(f"the {what} envelope has no string 'payloadType'")
    if not isinstance(encoded, str):
        raise VerificationError(f"the {what} envelope has no string 'payload'")
    if not isinstance(signatures, list) or not signatures:
        raise VerificationError(f"the {what} envelope has no 'signatures' list")
    if len(signatures) > MAX_SIGNATURES:
        raise VerificationError(f"the {what} envelope has more than {MAX_SIGNATURES} signatures")
    if found_type != payload_type:
        raise VerificationError(
            f"the {what} envelope's payloadType is {found_type!r}, not {payload_type!r}"
        )
    try:
        payload = _b64decode(encoded)
    except ValueError as exc:
        raise VerificationError(f"the envelope's payload is not valid base64: {exc}") from None

    candidates: list[bytes] = []
    others: list[str] = []
    for i, entry in enumerate(signatures):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("sig"), str):
            raise VerificationError(f"signature {i} of the envelope has no string 'sig'")
        hint = entry.get("keyid")
        if hint is not None and not isinstance(hint, str):
            raise VerificationError(f"signature {i} of the envelope has a non-string 'keyid'")
        try:
            sig = _b64decode(entry["sig"])
        except ValueError as exc:
            raise VerificationError(f"signature {i} is not valid base64: {exc}") from None
        if hint in (None, "", keyid):
            candidates.append(sig)
        else:
            others.append(inline(hint)[:80])  # unsigned: it reaches messages neutralised
    if not candidates:
        raise VerificationError(
            f"no signature by key {keyid}: the {what} is signed by another key"
            f" ({', '.join(others)})"
        )
    message = pae(found_type, payload)
    if not any(_verifies(key, sig, message) for sig in candidates):
        raise VerificationError(
            f"signature does not verify with key {keyid}: the {what} was altered or signed"
            " by another key"
        )
    return payload


def _verifies(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
