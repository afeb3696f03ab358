"""rwlib: the small shared library behind *Reweighting, Reproduced*.

The substrate (one job per module):

- :mod:`rwlib.catalog`  -- the 36 chapters: number, slug, title, part, file names
- :mod:`rwlib.repro`    -- seeding, device choice, quick/full mode and sizes
- :mod:`rwlib.data`     -- offline datasets, splits, augmentations, checksummed downloads
- :mod:`rwlib.models`   -- MLP and small CNNs (BatchNorm, 1-D and 2-D)
- :mod:`rwlib.train`    -- the one training loop, per-sample losses, EMA, evaluation
- :mod:`rwlib.ssl`      -- semi-supervised pieces (FixMatch losses, distribution alignment)
- :mod:`rwlib.viz`      -- the house plotting style and recurring figure kinds
- :mod:`rwlib.claims`   -- the claim ledger ("paper said / we measured")
- :mod:`rwlib.runner`, :mod:`rwlib.book`, :mod:`rwlib.cli` -- execute chapters, build the book

Each paper's own method lives in ``rwlib.methods.<slug>``.
"""

__version__ = "0.1.0"
