"""The systems HLC compares with (its Tables 1-3), each a stand-alone recipe on the kit's stages: run from the
repository root as `python -m systems.<name> ...`, or `make system NAME=<name>`; `make compare` runs them all."""
