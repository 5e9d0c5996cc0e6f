"""Tests of the maintainer scripts under dev/ (not a package: loaded by path, tests.helpers.load_dev)."""
