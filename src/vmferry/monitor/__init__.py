"""vmferry.monitor: the QMP server.

    backend = ...                                  # implements MonitorBackend (backend.py)
    server = QmpServer(CommandDispatcher(backend), ["unix:/tmp/vm.qmp", "tcp:127.0.0.1:4444"])
    server.emit_event("STOP")                      # from any thread
    server.close()

protocol.py is the sans-I/O core, server.py drives it over sockets, commands.py is the command
table, schema.py validates arguments, events.py lists the events, docs.py renders docs/qmp.md.
"""

from vmferry.monitor.backend import MonitorBackend
from vmferry.monitor.commands import COMMANDS, CommandDispatcher
from vmferry.monitor.protocol import QmpConnection, Session
from vmferry.monitor.server import QmpServer

__all__ = ["COMMANDS", "CommandDispatcher", "MonitorBackend", "QmpConnection", "QmpServer", "Session"]
