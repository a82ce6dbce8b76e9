#!/usr/bin/env python
"""Approach 3: expand the grids in memory and train (saesweep sweep).

A thin shim over the `saesweep` command; every flag of the classic command lines works here.
"""

from _shim import run

if __name__ == "__main__":
    run("sweep")
