"""Reinforcement learning from verifiable rewards for tiny language models (chapters 12-18).

- :mod:`rwlib.rl.losses`  -- group advantages, the clipped policy-gradient loss (GRPO, BNPO, Dr. GRPO, DAPO
  aggregations, asymmetric clipping, dual clip, per-token weights), token entropy, SFT loss, pass@k
- :mod:`rwlib.rl.rollout` -- batched group sampling with log-probs, rewards from a task's verifier
- :mod:`rwlib.rl.grpo`    -- the GRPO trainer built on :func:`rwlib.train.loop`, and task evaluation
"""

from .grpo import GRPOConfig, answer_loss, evaluate_task, exact_match, sft_objective, sft_train, train_grpo  # noqa: F401
from .losses import (AGGREGATIONS, aggregate, clipped_pg_loss, group_advantages, pass_at_k,  # noqa: F401
                     rloo_advantages, sft_loss, token_entropy)
from .rollout import Rollout, sample_completions, sequence_logprobs  # noqa: F401
