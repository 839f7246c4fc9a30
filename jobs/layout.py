"""Where everything lives under --output. One place, so the worker, finalizer and driver agree."""
from __future__ import annotations

import pyarrow as pa

from jobs.storage import Location, delete_dir, delete_file, list_dir, list_files, read_parquet

SCORES = "scores"  # final rescored shards, one file per input shard
REJECTS = "rejects"  # rows that could not be scored, with reject_reason
SHORTLISTS = "shortlists"  # --top-k: one row per query
WORK = "_work"  # intermediate state that makes reruns resume; safe to delete once the job succeeded


class DamagedWork(RuntimeError):
    """A committed shard's work files (OUT/_work) are missing or unreadable, e.g. deleted or truncated by hand.
    The message names the file and the remedy: delete the shard's scored file, so a rerun scores it again."""

    def __init__(self, layout: "OutputLayout", shard: str, what: str):
        super().__init__(f"shard {shard}: {what}. Delete {layout.scored(shard).uri} and rerun the same command: "
                         "the shard is scored again and the cross-shard ranking redone")

    @staticmethod
    def of(layout: "OutputLayout", problems: list[tuple[str, str]]) -> "DamagedWork":
        """One error naming every damaged shard, so one round of deletes mends them all."""
        if len(problems) == 1:
            return DamagedWork(layout, *problems[0])
        lines = "\n".join(f"  shard {shard}: {what}" for shard, what in problems)
        return _damaged_work(f"{len(problems)} shards have damaged work files:\n{lines}\nDelete each one's "
                             f"{layout.scored('<shard>').uri} and rerun the same command: they are scored again "
                             "and the cross-shard ranking redone")

    def __reduce__(self):  # raised in a Ray task, it is pickled: rebuild it from its message
        return _damaged_work, (str(self),)


def _damaged_work(message: str) -> "DamagedWork":
    e = DamagedWork.__new__(DamagedWork)
    RuntimeError.__init__(e, message)
    return e


class OutputLayout:
    def __init__(self, root: Location):
        self.root = root

    def scores(self, shard: str) -> Location:
        return self.root.child(SCORES, f"{shard}.parquet")

    def rejects(self, shard: str) -> Location:
        return self.root.child(REJECTS, f"{shard}.parquet")

    def scored(self, shard: str) -> Location:  # phase-1 output: scores, before cross-shard positions
        return self.root.child(WORK, "scored", f"{shard}.parquet")

    def committed_shards(self) -> set[str]:
        """Shards whose phase-1 output exists (committed), from one listing rather than a call per shard."""
        return {n.removesuffix(".parquet") for n in list_dir(self.root.child(WORK, "scored"))}

    def shards_with_stats(self) -> set[str]:
        """Shards whose stats file exists, from one listing."""
        return {n.removesuffix(".json") for n in list_dir(self.shard_stats_dir)}

    def read_work(self, loc: Location, shard: str):
        """A work file of a committed shard, or DamagedWork naming it (a read error would name neither)."""
        try:
            return read_parquet(loc)
        except (FileNotFoundError, pa.ArrowInvalid) as e:  # gone or corrupt; a storage timeout is not damage
            raise DamagedWork(self, shard, f"{loc.uri} cannot be read ({type(e).__name__}: {e})") from e

    def delete_shard(self, shard: str) -> None:
        """Everything a shard may have left: its final, rejects, scored and stats files, keys and positions."""
        for loc in (self.scores(shard), self.rejects(shard), self.scored(shard), self.shard_stats(shard)):
            delete_file(loc)
        for loc in (self.keys_dir(shard), self.positions_dir(shard)):
            delete_dir(loc)

    def key_files(self) -> dict[str, dict[int, Location]]:
        """Each shard's key files by query bucket (those it has rows in), from one recursive listing."""
        keys = self.root.child(WORK, "keys")
        return {shard: {int(n[1:6]): keys.child(shard, n) for n in names}  # names are b{bucket:05d}.parquet
                for shard, names in list_files(keys).items() if shard}

    def keys_dir(self, shard: str) -> Location:
        return self.root.child(WORK, "keys", shard)

    def keys(self, shard: str, bucket: int) -> Location:
        return self.root.child(WORK, "keys", shard, f"b{bucket:05d}.parquet")

    @staticmethod
    def shard_of_key(uri: str) -> str:
        """The shard a `keys(shard, bucket)` file belongs to."""
        return uri.rstrip("/").rsplit("/", 2)[-2]

    def positions(self, shard: str, bucket: int) -> Location:
        return self.root.child(WORK, "positions", shard, f"b{bucket:05d}.parquet")

    def positions_dir(self, shard: str) -> Location:
        return self.root.child(WORK, "positions", shard)

    def bucket_done(self, bucket: int) -> Location:
        return self.root.child(WORK, "positions", "_done", f"b{bucket:05d}.json")

    def shard_stats(self, shard: str) -> Location:
        return self.shard_stats_dir.child(f"{shard}.json")

    @property
    def shard_stats_dir(self) -> Location:
        return self.root.child(WORK, "stats")

    def shortlist(self, bucket: int) -> Location:
        return self.root.child(SHORTLISTS, f"b{bucket:05d}.parquet")

    @property
    def plan(self) -> Location:
        return self.root.child(WORK, "plan.json")

    @property
    def stats(self) -> Location:
        return self.root.child("stats.parquet")

    @property
    def manifest(self) -> Location:
        return self.root.child("manifest.json")
