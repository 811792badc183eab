"""What one push, pull or sync did, for the user."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SyncReport:
    """What one push, pull or sync did. Paths are relative to the roots."""

    uploaded: list[str] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    deleted_local: list[str] = field(default_factory=list)
    deleted_remote: list[str] = field(default_factory=list)
    #: (path, where the host's version was saved)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    #: (path, why it was not synced)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    host: str = ""

    @property
    def changed(self) -> bool:
        return bool(
            self.uploaded
            or self.downloaded
            or self.deleted_local
            or self.deleted_remote
            or self.conflicts
        )

    def warnings(self) -> list[str]:
        """One line for the user per conflict and per skipped file."""
        host = self.host or "the host"
        lines = [
            f"{path} changed here and on {host}: kept yours, saved {host}'s as {saved}"
            for path, saved in self.conflicts
        ]
        lines += [f"{path} was not synced: {reason}" for path, reason in self.skipped]
        return lines

    def merge(self, other: SyncReport) -> SyncReport:
        skipped = list(dict.fromkeys(self.skipped + other.skipped))
        return SyncReport(
            uploaded=self.uploaded + other.uploaded,
            downloaded=self.downloaded + other.downloaded,
            deleted_local=self.deleted_local + other.deleted_local,
            deleted_remote=self.deleted_remote + other.deleted_remote,
            conflicts=self.conflicts + other.conflicts,
            skipped=skipped,
            bytes=self.bytes + other.bytes,
            seconds=self.seconds + other.seconds,
            host=self.host or other.host,
        )
