"""gokiq's job history: one row per job and one per run, in PostgreSQL or SQLite (issue 14).

`recorder.open_recorder` gives the bridge and the workers what they record with; it imports
nothing heavy until history is on. `api` serves the history over HTTP (`gokiq-api`), `cli`
applies the migrations (`gokiq-history migrate`).
"""
