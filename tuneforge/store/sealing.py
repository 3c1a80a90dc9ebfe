"""Job secrets sealed at rest: a job's W&B key and hub token are stored encrypted (Fernet: AES-128-CBC with an
HMAC-SHA256), with a key kept outside the database: the `TUNEFORGE_SECRETS_KEY` setting, or a file made at first start
in the home folder (mode 0600). The database, its WAL and its backups then never hold a readable secret, and a
cleared secret leaves only ciphertext behind. Servers that share one database share the key (set the setting).

`Database.session()` puts the database's sealer in `session.info`; `store/jobs.py` seals on insert and opens on read,
so no caller handles a secret's stored form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from tuneforge.errors import TuneForgeError

KEY_FILE = "secrets.key"
_SEALED = "sealed"


class UnreadableSecretsError(TuneForgeError):
    """Stored secrets this server's key cannot open (another server's key, or a key that was replaced)."""

    status_code = 500
    error_type = "server_error"


class Sealer:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def seal(self, secrets: dict[str, str]) -> dict[str, Any]:
        """The stored form of `secrets`: `{}` for none, else one opaque token."""
        if not secrets:
            return {}
        return {_SEALED: self._fernet.encrypt(json.dumps(secrets).encode()).decode()}

    @staticmethod
    def is_sealed(stored: dict[str, Any] | None) -> bool:
        """Whether a stored form holds nothing readable: empty, or one sealed token."""
        return not stored or set(stored) == {_SEALED}

    def open(self, stored: dict[str, Any] | None) -> dict[str, str]:
        """The secrets of a stored form; a row written before sealing (plain keys) is read as it is."""
        if not stored:
            return {}
        if _SEALED not in stored:
            return {str(k): str(v) for k, v in stored.items()}
        try:
            return dict(json.loads(self._fernet.decrypt(str(stored[_SEALED]).encode())))
        except InvalidToken:
            raise UnreadableSecretsError(
                "this server's secrets key cannot open the job's stored secrets: servers that share a database "
                "must share one TUNEFORGE_SECRETS_KEY"
            ) from None


def ephemeral_sealer() -> Sealer:
    """A sealer whose key lives only in this process (tests and tools that run no job across a restart)."""
    return Sealer(Fernet.generate_key())


def home_key(home: Path, configured: str = "") -> bytes:
    """The secrets key: the configured one, else the home folder's key file, made (0600) on first use."""
    if configured:
        return configured.encode()
    path = home / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(Fernet.generate_key())
    return path.read_bytes().strip()
