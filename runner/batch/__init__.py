"""The Batch API pieces (API facts 7): `render` writes the batch files, `api` talks to the files and
batches endpoints, `state` records what was sent beside the output, `join` reads the answers back,
`pending` says what a job's pending batches forbid. The executor that drives them is
`runner.executors.batch`; `runner status` / `runner cancel` and `runner validate` use them too.
"""
