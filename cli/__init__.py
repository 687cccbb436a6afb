"""The ``mlxeff`` command line (installed as ``mlxeff.cli``)."""
