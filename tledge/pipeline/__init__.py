"""The whole path in one call (:mod:`.build`: ``tledge build``), and settings from ``tledge.toml`` (:mod:`.config`)."""

from tledge.pipeline.build import BuildConfig, build

__all__ = ["BuildConfig", "build"]
