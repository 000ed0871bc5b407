"""What every engine backend provides: the interface build, serve, bench and the pipeline use.

Instances are stateless; `toolchain.backends.BACKENDS` holds one per backend name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from toolchain.engine_profile import EngineProfile
    from toolchain.manifest import EngineManifest
    from toolchain.settings import DataConfig, ServeConfig


@dataclass
class BuildOutcome:
    """What a backend's build did. `built` is False when the engine build is left to a printed command;
    `manifest_fields` are recorded in the manifest; `smoke_text` is what a smoke generation produced."""

    built: bool
    message: str
    manifest_fields: dict = field(default_factory=dict)
    smoke_text: str | None = None


class EngineBackend(ABC):
    """One kind of engine: how a profile builds it, how Triton serves it, and whether Triton can serve it here."""

    name: ClassVar[str]  # the `backend` string of engine profiles and manifests

    @abstractmethod
    def profile_problems(self, profile: EngineProfile) -> list[str]:
        """Every reason `profile` cannot be built with this backend (target, precision, parallelism, its settings)."""

    @abstractmethod
    def check_model(self, profile: EngineProfile, model_dir: Path, config: dict, quantization: str) -> None:
        """Refuse, with a UserError, a model (config, existing `quantization`) this profile cannot build, before any work."""

    @abstractmethod
    def plan(self, profile: EngineProfile, quantization: str) -> list[str]:
        """The build steps in words, for --dry-run."""

    def build_command(self, profile: EngineProfile) -> str | None:
        """The external command that builds the engine, when the user may have to run it elsewhere."""
        return None

    @abstractmethod
    def build(self, profile: EngineProfile, model_dir: Path, config: dict, quantization: str, directory: Path, data: DataConfig) -> BuildOutcome:
        """Write the engine (in `directory`/engine) and whatever the backend keeps beside it; not the tokenizer or manifest."""

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why the Triton server the toolchain starts cannot serve this backend's engines on this machine; None when it can."""

    @abstractmethod
    def write_repository(self, engine_dir: Path, manifest: EngineManifest, repository: Path, model_name: str,
                         settings: ServeConfig) -> list[str]:
        """Add the Triton models that serve this engine as `model_name` to `repository`, sized by `settings`; returns the models written.

        Settings the engine cannot honour (a budget that cannot hold one request) are a UserError here, before Triton starts."""

    def repository_notes(self, engine_dir: Path, manifest: EngineManifest, repository: Path) -> list[str]:
        """What a user who wrote the repository with `serve --repo-only` must do next."""
        return []

    def load_tokenizer(self, engine_dir: Path, manifest: EngineManifest):
        """The tokenizer clients use for this engine: the manifest's tokenizer folder."""
        from toolchain.models import read_tokenizer

        return read_tokenizer(Path(engine_dir) / manifest.tokenizer_dir)
