"""The REST routes, one module per resource; their shared helpers are in `common`."""
