"""The HTTP side: riders' availability, device state, health; and the ``chargewatch`` command.

Exceptions raised to clients are JSON: ``{"error": code, "detail": ...}`` with 404 for unknown
ids and 422 for invalid query values.
"""
