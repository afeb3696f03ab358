"""Reinforcement learning from verifiable rewards for tiny language models (chapters 12-18).

- :mod:`rwlib.rl.losses`  -- group advantages, the clipped policy-gradient loss (GRPO, BNPO, Dr. GRPO, DAPO
  aggregations, asymmetric clipping, dual clip, per-token weights), token entropy, SFT loss, pass@k
- :mod:`rwlib.rl.rollout` -- batched group sampling with log-probs, rewards from a task's verifier, pass@k
  evaluation of a model on a task
- :mod:`rwlib.rl.grpo`    -- the GRPO trainer built on :func:`rwlib.train.loop`
- :mod:`rwlib.rl.offline` -- offline RL: transition datasets and discrete CQL

Supervised fine-tuning lives in :mod:`rwlib.finetune`.
"""

from .grpo import GRPOConfig, train_grpo  # noqa: F401
from .losses import (AGGREGATIONS, aggregate, clipped_pg_loss, group_advantages, pass_at_k,  # noqa: F401
                     rloo_advantages, sft_loss, token_entropy, token_logprobs)
from .rollout import Rollout, evaluate_task, sample_completions, score, sequence_logprobs  # noqa: F401
