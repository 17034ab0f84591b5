"""Small catalogs for the cluster tests: ``stations`` stations of ``per_station`` piles."""

from __future__ import annotations

from typing import Any

from devices.catalog import Catalog, CatalogFile


def synthetic(stations: int, per_station: int = 1, prefix: str = "st") -> Catalog:
    data: dict[str, Any] = {
        "district": {"name": {"zh": "测试", "en": "Test"}, "lat": 31.742, "lon": 117.296},
        "stations": [
            {
                "id": f"{prefix}-{s:04d}",
                "name": {"zh": f"站 {s}", "en": f"Station {s}"},
                "lat": 31.742,
                "lon": 117.296,
                "address": {"zh": "测试", "en": "test"},
                "site_kind": "roadside",
                "devices": [
                    {"id": f"D{s:04d}x{d}", "kind": "pile", "ports": 2} for d in range(per_station)
                ],
            }
            for s in range(stations)
        ],
    }
    return Catalog(CatalogFile.model_validate(data))
