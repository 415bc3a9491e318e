"""``diffmoe repro``: controlled experiments that test the papers' claims at small scale, with seeds.

:mod:`.spec` reads the definitions under ``experiments/`` (suites, arms, groups), :mod:`.runner` trains
and measures one (arm, seed) at a time and resumes what is done, :mod:`.stats` turns the runs into
paired comparisons with intervals and verdicts, :mod:`.plots` and :mod:`.report` write the plots,
``REPORT.md`` and ``report.json``; :mod:`.suite` drives them.
"""
