"""Secrets at rest: app environment values, deploy keys and passwords are encrypted."""

from __future__ import annotations

import base64
import hashlib
import os
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
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


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
