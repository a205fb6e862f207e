"""Multi-turn search rollouts: the agent loop, trajectory records and the retriever client."""
