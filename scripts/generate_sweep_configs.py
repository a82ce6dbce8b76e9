#!/usr/bin/env python
"""Approach 1: write one config YAML per experiment (saesweep generate).

A thin shim over the `saesweep` command; every flag of the classic command lines works here.
"""

from _shim import run

if __name__ == "__main__":
    run("generate")
