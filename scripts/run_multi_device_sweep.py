#!/usr/bin/env python
"""Approach 5: multi-device scheduler, dynamic queue per device (saesweep sweep --policy dynamic).

A thin shim over the `saesweep` command; every flag of the classic command lines works here.
"""

from _shim import run

if __name__ == "__main__":
    run("sweep", "--policy", "dynamic")
