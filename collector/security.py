"""CURVE authentication for a non-loopback ZeroMQ endpoint.

Key files (made by `tensortap keys PREFIX`): PREFIX.key holds the public key and the secret
key (Z85, one per line, mode 0600); PREFIX.pub holds the public key only. An allow-list file
holds one client public key per line ('#' lines not 40 characters long are comments). A client whose key is not
listed is refused during the handshake: none of its frames reach the collector.
"""
from __future__ import annotations

import ipaddress
import os


def is_loopback(host: str) -> bool:
    """Whether a host (name or address, IPv6 with or without brackets) is this machine only:
    the one test of both the CLI's checks and the server's binding."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_keypair(prefix: str, overwrite: bool = False) -> str:
    """Write PREFIX.key and PREFIX.pub. An existing pair is kept unless overwrite: replacing
    a secret key locks out every client that trusts the old public key. Raises OSError
    (FileExistsError for an existing file)."""
    import zmq

    if not overwrite:
        for path in (prefix + ".key", prefix + ".pub"):
            if os.path.exists(path):
                raise FileExistsError(17, "already exists (pass --force to replace the pair)", path)
    pub, sec = zmq.curve_keypair()
    fd = os.open(prefix + ".key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # (a file replaced with --force keeps its mode otherwise)
    except OSError:
        os.close(fd)
        raise
    with os.fdopen(fd, "wb") as f:
        f.write(pub + b"\n" + sec + b"\n")
    with open(prefix + ".pub", "wb") as f:
        f.write(pub + b"\n")
    return pub.decode()


def read_keypair(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a .key file."""
    with open(path, "rb") as f:
        lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    if len(lines) != 2 or any(len(k) != 40 for k in lines):
        raise ValueError(f"{path}: expected two Z85 keys (public, secret), from `tensortap keys`")
    return lines[0], lines[1]


def read_allow_list(path: str) -> set[bytes]:
    keys = set()
    with open(path, "rb") as f:
        for ln in f.read().splitlines():
            ln = ln.strip()
            # '#' is also a Z85 character: a comment is a '#' line that is not a key's length
            if ln and not (ln.startswith(b"#") and len(ln) != 40):
                if len(ln) != 40:
                    raise ValueError(f"{path}: {ln[:50]!r} is not a Z85 public key (40 characters)")
                keys.add(ln)
    return keys


class _AllowList:
    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain, key: bytes) -> bool:  # key: the client's public key, Z85
        return key in self.keys


def enable_curve(ctx, sock, secret_file: str, allow_file: str):
    """Make `sock` a CURVE server accepting only allow-listed clients; returns the
    authenticator (stop it on shutdown)."""
    from zmq.auth.thread import ThreadAuthenticator

    pub, sec = read_keypair(secret_file)
    allowed = read_allow_list(allow_file)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(allowed))
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = sec, pub, True
    return auth
