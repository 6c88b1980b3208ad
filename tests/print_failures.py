#!/usr/bin/env python3
"""Prints each failed test case of the JUnit XML files named on stdin (one
path per line, under bazel-testlogs/ or the testlogs/ folder it links to),
one line each: target, test and the start of its failure message.
run_all.sh prints these last, where the tail of a long CI log still shows
why a run failed."""

import sys
import xml.etree.ElementTree as ET


def main():
    for path in sys.stdin.read().splitlines():
        if not path:
            continue
        target = path.split("testlogs/", 1)[-1].removesuffix("/test.xml")
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as e:
            print(f"FAILED {target}: unreadable results ({e})")
            continue
        for case in root.iter("testcase"):
            for bad in list(case.iter("failure")) + list(case.iter("error")):
                what = (bad.get("message") or bad.text or "").strip().replace("\n", " | ")
                name = f"{case.get('classname')}.{case.get('name')}"
                print(f"FAILED {target}: {name}: {what[:600]}")


if __name__ == "__main__":
    main()
