"""Multi-turn search rollouts: the agent loop, trajectory records and the retriever client.

Import the pieces from their modules (``rollout.driver.rollout``, ``rollout.trajectory``,
``rollout.retriever``); this package stays import-light so the retriever client does not pull
in JAX.
"""
