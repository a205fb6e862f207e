"""StepSearch rewards: SQuAD EM/F1, format gate, search-key reward, information gain, redundancy,
and the token-level reward tensor (method §3). See :mod:`stepsearch_jax.rewards.score` for the
`paper` and `released` presets and every difference between them.
"""

from stepsearch_jax.rewards.score import RewardConfig, ScoreResult, score, token_rewards
from stepsearch_jax.rewards.text import em, eval_answer, extract_answer, f1, format_ok, normalize

__all__ = ["RewardConfig", "ScoreResult", "score", "token_rewards", "em", "f1", "extract_answer",
           "eval_answer", "format_ok", "normalize"]
