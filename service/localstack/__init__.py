"""The local process supervisor behind ``klssl up``: Ray, MLflow and the API on loopback."""
