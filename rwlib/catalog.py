"""The book's chapters: one paper each, numbered and grouped into four parts.

This is the single list the runner, the book builder and the tests read. The file names of a chapter
follow from its number and slug (DESIGN.md, "one paper, four files")::

    book/<part dir>/NN-slug.ipynb   rwlib/methods/slug.py   tests/methods/test_slug.py   NN-slug.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Part:
    number: int
    roman: str
    title: str
    dirname: str


PARTS = (
    Part(1, "I", "Reweighting samples", "part1-samples"),
    Part(2, "II", "Reweighting data, objectives and rewards for language models", "part2-language-models"),
    Part(3, "III", "Reweighting the weights: parameterization, fine-tuning, compression", "part3-weights"),
    Part(4, "IV", "Weights over time and scale: continual learning, learning regimes, scaling, search",
         "part4-time-and-scale"),
)


@dataclass(frozen=True)
class Chapter:
    number: int
    slug: str
    title: str
    part_number: int

    @property
    def part(self) -> Part:
        return PARTS[self.part_number - 1]

    @property
    def stem(self) -> str:
        """``NN-slug``: the notebook's and the ledger's name without extension."""
        return f"{self.number:02d}-{self.slug}"

    @property
    def module(self) -> str:
        return "rwlib.methods." + self.slug.replace("-", "_")

    @property
    def notebook(self) -> Path:
        """Path of the chapter notebook relative to the repository root."""
        return Path("book") / self.part.dirname / f"{self.stem}.ipynb"

    @property
    def ledger_name(self) -> str:
        return f"{self.stem}.json"

    def written(self, root: Path | None = None) -> bool:
        """True when the chapter's notebook exists in the repository."""
        return ((root or ROOT) / self.notebook).exists()


CHAPTERS = (
    Chapter(1, 'shrinkmatch', 'Shrinking Class Space for Enhanced Certainty in Semi-Supervised Learning', 1),
    Chapter(2, 'meta-loss-rescaling', 'Learning from Noisy Labels via Self-Taught On-the-Fly Meta Loss Rescaling', 1),
    Chapter(3, 'srat', 'Imbalanced Adversarial Training with Reweighting', 1),
    Chapter(4, 'doubly-robust-at', 'Doubly Robust Instance-Reweighted Adversarial Training', 1),
    Chapter(5, 'kernel-balancing', 'Debiased Collaborative Filtering with Kernel-Based Causal Balancing', 1),
    Chapter(6, 'presto', 'Predicting Rare Events by Shrinking Towards Proportional Odds', 1),
    Chapter(7, 'trajectory-weighting', 'Harnessing Mixed Offline Reinforcement Learning Datasets via Trajectory Weighting', 1),
    Chapter(8, 'quantile-aggregation', 'Flexible Model Aggregation for Quantile Regression', 1),
    Chapter(9, 'pld', 'PLD: A Choice-Theoretic List-Wise Knowledge Distillation', 1),
    Chapter(10, 'loss-reweighting-pretraining', 'Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining', 2),
    Chapter(11, 'data-mixing-agent', 'Data Mixing Agent: Learning to Re-weight Domains for Continual Pre-training', 2),
    Chapter(12, 'recap', 'Beyond Reasoning Gains: Mitigating General Capabilities Forgetting in Large Reasoning Models', 2),
    Chapter(13, 'steer', 'Rethinking Entropy Interventions in RLVR: An Entropy Change Perspective', 2),
    Chapter(14, 'dynamic-reward-weighting', 'Learning to Optimize Multi-Objective Alignment Through Dynamic Reward Weighting', 2),
    Chapter(15, 'constrained-rlhf', 'Confronting Reward Model Overoptimization with Constrained RLHF', 2),
    Chapter(16, 'grpo-guard', 'GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated Clipping', 2),
    Chapter(17, 'relift', "Learning What Reinforcement Learning Can't: Interleaved Online Fine-Tuning for Hardest Questions", 2),
    Chapter(18, 'retuning', 'RETuning: Upgrading Inference-Time Scaling for Stock Movement Prediction with Large Language Models', 2),
    Chapter(19, 'bone', 'Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large Language Models', 3),
    Chapter(20, 'lift', 'LIFT the Veil for the Truth: Principal Weights Emerge after Rank Reduction for Reasoning-Focused Supervised Fine-Tuning', 3),
    Chapter(21, 'perp', 'PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs', 3),
    Chapter(22, 'oracle-pruning', 'Is Oracle Pruning the True Oracle?', 3),
    Chapter(23, 'ofq', 'Oscillation-free Quantization for Low-bit Vision Transformers', 3),
    Chapter(24, 'adamp', 'AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights', 3),
    Chapter(25, 'weight-compander', 'Weight Compander: A Simple Weight Reparameterization for Regularization', 3),
    Chapter(26, 'robust-weight-signatures', 'Robust Weight Signatures: Gaining Robustness as Easy as Patching Weights?', 3),
    Chapter(27, 'loss-curvature', 'From Memorization to Reasoning in the Spectrum of Loss Curvature', 3),
    Chapter(28, 'statmech-continual', 'Statistical mechanics of continual learning: variational principle and mean-field potential', 4),
    Chapter(29, 'contracon', 'Exemplar-Free Continual Transformer with Convolutions', 4),
    Chapter(30, 'weight-aligning', 'Maintaining Discrimination and Fairness in Class Incremental Learning', 4),
    Chapter(31, 'rich-lazy', 'How connectivity structure shapes rich and lazy learning in neural circuits', 4),
    Chapter(32, 'scaling-laws', 'Unraveling the Mystery of Scaling Laws: Part I', 4),
    Chapter(33, 'scaling-crossover', 'Rethinking Conventional Wisdom in Machine Learning: From Generalization to Scaling', 4),
    Chapter(34, 'universality-lens', 'The Universality Lens: Why Even Highly Over-Parametrized Models Learn Well', 4),
    Chapter(35, 'bignas', 'BigNAS: Scaling Up Neural Architecture Search with Big Single-Stage Models', 4),
    Chapter(36, 'sft-vs-cl-reranking', 'Supervised Fine-Tuning or Contrastive Learning? Towards Better Multimodal LLM Reranking', 4),
)


def chapter(key: int | str) -> Chapter:
    """Look a chapter up by number (``24``, ``"24"``, ``"024"``) or slug (``"adamp"``).

    Raises ``KeyError`` with the valid choices when there is no such chapter.
    """
    text = str(key).strip()
    for ch in CHAPTERS:
        if text == ch.slug or text == ch.stem or (text.isdigit() and int(text) == ch.number):
            return ch
    raise KeyError(f"unknown chapter {key!r}; valid: numbers 01-{len(CHAPTERS):02d} or slugs "
                   + ", ".join(c.slug for c in CHAPTERS))


def written_chapters(root: Path | None = None) -> list[Chapter]:
    """The chapters whose notebooks exist, in book order."""
    return [c for c in CHAPTERS if c.written(root)]
