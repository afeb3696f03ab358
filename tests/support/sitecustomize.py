"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (the chapter kernels in
the test run): any socket connection to a non-loopback address raises, so a chapter that touches the
network in quick mode fails loudly. Loopback stays open: the Jupyter kernel talks to papermill over it."""

import ipaddress
import socket

_connect, _connect_ex, _sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto


class NetworkBlocked(OSError):
    pass


def _check(address):
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if host == "localhost":
                return
            raise NetworkBlocked(f"network access blocked in quick mode: {address!r}")
        if not ip.is_loopback:
            raise NetworkBlocked(f"network access blocked in quick mode: {address!r}")


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address)
    return _connect_ex(self, address)


def sendto(self, data, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(args[-1])
    return _sendto(self, data, *args)


socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
