"""vmferry.transport: migration URIs to channels — the bytes' road, blind to what they carry.

    parse_uri("tcp:[::1]:4444")      -> TcpUri(host="::1", port=4444)
    connect_outgoing(uri)            -> Channel       (source)
    listen_incoming(uri).accept()    -> Channel       (destination)
    RateLimiter, ThroughputMeter     pacing and measuring on bytes the socket accepted
"""

from vmferry.transport.bandwidth import RateLimiter, ThroughputMeter
from vmferry.transport.channel import Channel, FdChannel, SocketChannel
from vmferry.transport.command import ExecChannel
from vmferry.transport.connect import Listener, connect_outgoing, listen_incoming
from vmferry.transport.uri import ExecUri, FdUri, FileUri, MigrationUri, TcpUri, UnixUri, parse_uri

__all__ = [
    "Channel",
    "ExecChannel",
    "ExecUri",
    "FdChannel",
    "FdUri",
    "FileUri",
    "Listener",
    "MigrationUri",
    "RateLimiter",
    "SocketChannel",
    "TcpUri",
    "ThroughputMeter",
    "UnixUri",
    "connect_outgoing",
    "listen_incoming",
    "parse_uri",
]
