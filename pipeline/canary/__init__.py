"""The canary: a small Wan-architecture model trained in this repo on procedural clips (`grammar`), shipped as
package data (`weights/`), loaded by ``load_backend("canary")``. Train with ``python -m pipeline.canary.train``."""
