"""``HOST:PORT`` strings, as the CLI takes them for servers and clients."""

from __future__ import annotations


def parse_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) into host and port.

    Raises:
        ValueError: if there is no host, or the port is not an integer in 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port in {text!r} must be an integer in 0..65535")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`, bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
