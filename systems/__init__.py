"""The systems HLC compares with (its Tables 1-3), each a stand-alone recipe on the kit's stages: run as
`python -m systems.<name> ...` from the repository root or `python path/to/systems/<name>.py ...` from anywhere, or
`make system NAME=<name>`; `make compare` runs them all."""
