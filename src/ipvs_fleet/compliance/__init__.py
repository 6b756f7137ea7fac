"""Compliance: run the host checks in `checks/` against a pyinfra inventory and report.

`ipvs-fleet check inventory/<env>.py` gives a summary per host class, JUnit XML, JSON and a
Markdown/HTML report; waivers (YAML) excuse known failures until they expire.
"""
