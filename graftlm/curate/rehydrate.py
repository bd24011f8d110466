"""Rehydration (FineWeb2): after deduplication, write each kept document several times according to how many
near-duplicates it had. Content that many pages repeat is usually worth more than content seen once; content
repeated a thousand times is usually boilerplate, so the table brings it back to one copy. The table is the
recipe's own (`curate.rehydrate: {size: times}`) or FineWeb2's for the language (`curate.rehydrate: fineweb2`,
computed by FineWeb2 from how often each cluster size was filtered out in that language)."""

from __future__ import annotations

import bisect

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from graftlm.curate.fineweb2 import rehydration_weights
from graftlm.errors import RecipeError
from graftlm.languages import language


def rehydration_table(rehydrate: dict[int, int] | str | None, max_repetitions: int, lang: str) -> dict[int, int] | None:
    """The table in force for a language: the recipe's, or FineWeb2's for `lang` when the recipe says `fineweb2`."""
    if rehydrate != "fineweb2":
        return rehydrate
    table = rehydration_weights(lang, max_repetitions)
    if table is None:
        found = language(lang)
        raise RecipeError(f"curate.rehydrate: FineWeb2 has no rehydration weights for {found.name} ({found.code}, "
                          f"{found.fineweb2}); give a table {{cluster size: times}} or null")
    return table


def times_for(table: dict[int, int], cluster_size: int) -> int:
    """The times of the largest table size that is <= `cluster_size` (table: {min cluster size: times})."""
    sizes = sorted(table)
    return table[sizes[bisect.bisect_right(sizes, cluster_size) - 1]]


class Rehydrate(PipelineStep):
    """Repeats each document `times_for(table, metadata.minhash_cluster_size)` times (1 for a unique document), and
    counts the cluster sizes (`cluster_size_<n>`: kept documents, hence clusters, of that size)."""

    type = "💧 - REHYDRATE"
    name = "FineWeb2 rehydration"

    def __init__(self, table: dict[int, int] | None):
        super().__init__()
        self.table = dict(table) if table else {1: 1}

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            size = doc.metadata.get("minhash_cluster_size", 1)
            self.stat_update(f"cluster_size_{size}")
            times = times_for(self.table, size)
            if times > 1:
                self.stat_update("repeated_documents")
            for _ in range(times):
                yield doc
