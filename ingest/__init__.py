"""MQTT -> decode/validate -> order/dedupe -> device twins -> stores.

Exceptions::

    IngestError
    ├── StoreError            a store failed (bug or corrupt data)
    │   └── StoreUnavailable  a store cannot be reached now: retry later, ack nothing
    └── BrokerConfigError     the broker URL or options cannot work
        └── CredentialsError  the broker credentials file is missing or malformed
                              (ingest.brokerauth)
"""


class IngestError(Exception):
    pass


class StoreError(IngestError):
    pass


class StoreUnavailable(StoreError):
    pass


class BrokerConfigError(IngestError):
    pass
