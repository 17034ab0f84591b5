"""Partitions of the fleet: which ingest worker's MQTT session carries which device.

A fixed number of partitions (default 16). A **station** maps to one partition by a stable
hash of its id, so every device of a station lands in the same partition and station-level
rules (station offline, nothing available) see the whole station::

    partition(station) = int.from_bytes(blake2b(station_id.encode("utf-8"), digest_size=8)) % N

(big-endian; independent of Python's hash seed, of the process and of the machine). A device
belongs to its station's partition, through the catalog (or a device added at run time with
its station). Each partition is one MQTT persistent session whose client id is derived from
the partition, the partition count and a configurable prefix (``cw-ingest-p03of16``), so a
different partition count never resumes a session that carried other devices; the session
subscribes to exactly its devices' topics (``cw/v1/{device_id}/+``), which keeps each
device's order on any broker.
"""

from __future__ import annotations

import hashlib
import re

from devices.catalog import Catalog
from devices.topics import DEFAULT_PREFIX, DEVICE_ID_RE

DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 1024  # a worker holds a database lock and an MQTT session per partition
DEFAULT_CLIENT_PREFIX = "cw-ingest"
# MQTT client ids: keep to what every broker accepts (letters, digits, - and _)
_CLIENT_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}\Z")


def check_partitions(n: int) -> int:
    """``n`` when it is a usable partition count (1..MAX_PARTITIONS), else ValueError."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PARTITIONS:
        raise ValueError(f"the partition count must be 1..{MAX_PARTITIONS}, not {n!r}")
    return n


def station_partition(station_id: str, partitions: int) -> int:
    """The partition of ``station_id`` among ``partitions`` (module docstring)."""
    digest = hashlib.blake2b(station_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % check_partitions(partitions)


class PartitionMap:
    """Stations and devices by partition, for one partition count and topic prefix."""

    def __init__(
        self,
        catalog: Catalog,
        partitions: int = DEFAULT_PARTITIONS,
        *,
        topic_prefix: str = DEFAULT_PREFIX,
        client_prefix: str = DEFAULT_CLIENT_PREFIX,
    ) -> None:
        self.partitions = check_partitions(partitions)
        if not _CLIENT_PREFIX_RE.match(client_prefix):
            raise ValueError(
                f"client id prefix {client_prefix!r}: 1-40 letters, digits, '-' or '_'"
            )
        prefix = topic_prefix.strip("/")
        if not prefix or any(c in prefix for c in "+#"):
            raise ValueError(f"topic prefix {topic_prefix!r} must be non-empty and free of + and #")
        self.topic_prefix = prefix
        self.client_prefix = client_prefix
        self._device_partition: dict[str, int] = {}
        self._devices: list[list[str]] = [[] for _ in range(self.partitions)]
        for device in catalog.devices.values():
            self.add_device(device.id, device.station_id)

    def of_station(self, station_id: str) -> int:
        return station_partition(station_id, self.partitions)

    def of_device(self, device_id: str) -> int | None:
        """The partition of a known device; None for a device in no catalog."""
        return self._device_partition.get(device_id)

    def add_device(self, device_id: str, station_id: str) -> tuple[int, bool]:
        """Place a device (of the catalog, or added to the registry at run time): its
        partition, and whether it is new. A device keeps its first station's partition."""
        if not DEVICE_ID_RE.match(device_id):
            raise ValueError(f"invalid device id {device_id!r}")
        known = self._device_partition.get(device_id)
        if known is not None:
            return known, False
        p = self.of_station(station_id)
        self._device_partition[device_id] = p
        self._devices[p].append(device_id)
        return p, True

    def devices(self, partition: int) -> list[str]:
        return list(self._devices[self._index(partition)])

    def topic_filter(self, device_id: str) -> str:
        """The one subscription that carries every channel of ``device_id``."""
        return f"{self.topic_prefix}/{device_id}/+"

    def topic_filters(self, partition: int) -> list[str]:
        return [self.topic_filter(d) for d in self._devices[self._index(partition)]]

    def client_id(self, partition: int) -> str:
        """The MQTT client id of the partition's persistent session."""
        width = len(str(self.partitions - 1))
        return f"{self.client_prefix}-p{self._index(partition):0{width}d}of{self.partitions}"

    def _index(self, partition: int) -> int:
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} is outside 0..{self.partitions - 1}")
        return partition
