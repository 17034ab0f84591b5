"""HTTP routes, one module per audience: riders, maintenance, health."""
