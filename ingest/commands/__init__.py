"""Remote commands (contract v1.1): a maintainer asks, the service persists the command,
publishes it to the device's ``cmd`` topic and resends it until the device answers with a
``command_result`` event or the command expires. See docs/commands.md.

Modules: ``config`` (options), ``model`` (the command record and its view), ``store``
(SQLite, the service's file), ``service`` (``Commands``: create, resend, expire, apply
results; publishes through the ingest MQTT source's own connection, see
``ingest.gmqtt_source`` for why).

Exceptions::

    CommandError
    ├── CommandInvalid    the command does not fit the device (type, kind, unit, ttl): 422
    ├── CommandNotFound   no device or command with that id: 404
    └── TooManyCommands   too many open commands for one device: 429
"""

from __future__ import annotations


class CommandError(Exception):
    pass


class CommandInvalid(CommandError):
    pass


class CommandNotFound(CommandError):
    pass


class TooManyCommands(CommandError):
    pass
