"""The canary: a small Wan-architecture model trained in this repo on procedural clips (`grammar`), shipped as
package data (`weights/`), loaded by ``load_backend("canary")``; the context canary (`weights_ctx/`, uncaptioned
`marks` carried by its cache) by ``load_backend("canary-ctx")``. Train with ``python -m pipeline.canary.train``."""
