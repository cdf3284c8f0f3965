"""Vaults on the local network, for a field camp without internet: `vaultfs serve` announces
itself by multicast DNS service discovery (`_vaultfs._tcp`, python-zeroconf), `vaultfs peers`
lists who answers. An announcement is only a hint where to connect: a vault still has to prove
its pairing (wire.Channel.handshake) before anything is read or written.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from zeroconf import ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf, get_all_addresses

SERVICE = "_vaultfs._tcp.local."


@contextlib.contextmanager
def announce(vault_id: bytes, name: str, host: str, port: int) -> Iterator[None]:
    """Announce a vault served on host:port (0.0.0.0: on every address of this machine) for
    as long as the block runs."""
    addresses = get_all_addresses() if host in ("0.0.0.0", "") else [host]
    short = vault_id.hex()[:8]
    info = ServiceInfo(SERVICE, f"{name}-{short}.{SERVICE}", port=port,
                       parsed_addresses=addresses,
                       properties={"id": vault_id.hex(), "name": name},
                       server=f"vaultfs-{short}.local.")
    zc = Zeroconf()
    try:
        zc.register_service(info)
        try:
            yield
        finally:
            zc.unregister_service(info)
    finally:
        zc.close()


def browse(seconds: float) -> list[dict]:
    """The vaults that announce themselves within `seconds`: name, id, and tcp:// addresses."""
    found: dict[str, ServiceInfo] = {}

    class Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, kind: str, name: str) -> None:
            info = zc.get_service_info(kind, name, timeout=2000)
            if info is not None:
                found[name] = info

        update_service = add_service

        def remove_service(self, zc: Zeroconf, kind: str, name: str) -> None:
            found.pop(name, None)

    zc = Zeroconf()
    try:
        browser = ServiceBrowser(zc, SERVICE, Listener())
        time.sleep(seconds)
        browser.cancel()
    finally:
        zc.close()
    out = []
    for info in found.values():
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                 for k, v in info.properties.items()}
        out.append({"name": props.get("name", ""), "id": props.get("id", ""),
                    "urls": [f"tcp://{a}:{info.port}" for a in info.parsed_addresses()]})
    return sorted(out, key=lambda p: (p["name"], p["id"]))
