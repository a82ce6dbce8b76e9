#!/usr/bin/env python
"""Approach 6: device-aware runner, round-robin distribution (saesweep sweep --policy round_robin).

A thin shim over the `saesweep` command; every flag of the classic command lines works here.
"""

from _shim import run

if __name__ == "__main__":
    run("sweep", "--policy", "round_robin")
