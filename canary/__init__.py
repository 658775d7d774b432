"""The canary's development package: the procedural clip grammar, the clip renderer, training, the artefact detector
and the effect harness. The trained weights and their loader live in `pipeline.model.canary` (the backend loads them
without this package); train new ones with ``python -m canary.train --out DIR``."""
