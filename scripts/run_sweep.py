#!/usr/bin/env python
"""Approach 1: run a folder of configs, skipping finished ones (saesweep run).

A thin shim over the `saesweep` command; every flag of the classic command lines works here.
"""

from _shim import run

if __name__ == "__main__":
    run("run")
