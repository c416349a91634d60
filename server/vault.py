"""Secrets at rest: app environment values, deploy keys and passwords are encrypted."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

MASK = "*****"
_PREFIX = "enc:v1:"


def load_or_create_key(data_dir: Path, configured: str = "") -> bytes:
    """The Fernet key: derived from SCALARIUM_SECRET_KEY, else kept in the data dir (0600)."""
    if configured:
        return base64.urlsafe_b64encode(hashlib.sha256(configured.encode()).digest())
    path = data_dir / "secret.key"
    if path.exists():
        return path.read_bytes().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Several processes may start at once (gunicorn workers): the key is written whole to a
    # private temporary file and linked into place, so every process ends up with one key.
    fd, temporary = tempfile.mkstemp(dir=data_dir, prefix=".secret.key.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(Fernet.generate_key())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)
    return path.read_bytes().strip()


class Vault:
    """Encrypts and decrypts secret strings with one key."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def encrypt(self, plaintext: str) -> str:
        """Ciphertext for storage."""
        return _PREFIX + self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, stored: str) -> str:
        """Plaintext of a stored value (values stored before encryption pass through)."""
        if not stored.startswith(_PREFIX):
            return stored
        try:
            return self._fernet.decrypt(stored[len(_PREFIX) :].encode()).decode()
        except InvalidToken as exc:
            raise ValueError("secret cannot be decrypted with this installation's key") from exc
