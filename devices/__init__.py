"""The chargewatch domain, pure: contract v1, topics, fault codes, availability rules, catalog.

Nothing here does I/O, touches a network or a database, or imports asyncio; every other
package depends on this one and it depends on nothing of ours.
"""
