"""One module per paper: ``rwlib/methods/<slug>.py`` holds that paper's method and nothing else.

The rule every chapter follows:

- A method module holds the paper's method: its loss, its weighting rule, its optimizer, its selection rule, and
  the small pieces only that method needs. Its docstring cites the paper and writes out the equations it
  implements; the line that computes an equation says which one it is.
- It holds no experiment driver: no loop over methods or seeds, no training recipe, no report. Experiments are
  calls into the substrate's kits -- :func:`rwlib.sweep.sweep` for arms x seeds (every method-vs-baseline
  comparison goes through it), :mod:`rwlib.finetune` for fine-tuning (a method registers itself with
  :func:`rwlib.finetune.register`), :mod:`rwlib.rl` for rollouts, GRPO and offline RL, :func:`rwlib.train.fit` /
  :func:`rwlib.train.loop` for training.
- No notebook defines a training loop or a model. A chapter's code cells stay short: under about 100 lines in
  all, each line at most 100 characters.
- Randomness comes from named streams (:func:`rwlib.repro.stream`), never from reseeding the global generator.
"""
