"""The parts of bench/imap_mixed.py, split by job.

- ``wire``: IMAP response tokenizer and sequence-set helpers;
- ``session``: the strict client, which tracks the view and counts protocol errors;
- ``workload``: the command mix (``Worker``), seeding, the mixed and APPEND runs;
- ``report``: statistics, the JSON-ready summary and the printed report;
- ``servers``: harnesses that start Dovecot or AgentPost for a run;
- ``cli``: the command line (``bench/imap_mixed.py`` only calls ``cli.main``).

Only the standard library is needed against an existing server; ``servers.AgentPost``
imports bench/imap_bench.py and, through it, the project.
"""
