"""The datatrove readers of the curation pipeline.

`SourceReader` reads a recipe source with graftlm's own reader (graftlm/data/read.py) rather than datatrove's
JsonlReader/ParquetReader, so that a curated source accepts exactly what an uncurated one does: .txt and .tsv,
`text_field`, `txt_documents`, `max_documents`, and the same `file:line` errors or `on_error: skip` counts.
"""

from __future__ import annotations

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader

from graftlm.data.config import SourceConfig
from graftlm.data.read import ReadStats, read_records, resolve_paths


class SourceReader(PipelineStep):
    """The documents of one recipe source, split between the pipeline's tasks.

    With at least as many files as tasks, each task reads whole files (files[rank::world_size]); with fewer (a
    single 30 MB .jsonl), every task parses all files and keeps every world_size-th document, so that both cores
    work. Parsing is cheap next to language ID and word splitting. Document ids are `path:line`.
    """

    type = "📖 - READER"
    name = "graftlm source reader"

    def __init__(self, name: str, source: SourceConfig):
        super().__init__()
        self.source_name, self.source = name, source

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        files = resolve_paths(self.source, self.source_name)
        by_file = len(files) >= world_size and self.source.max_documents is None
        source = self.source.model_copy(update={"paths": files[rank::world_size]}) if by_file else self.source
        stats = ReadStats()
        for index, record in enumerate(read_records(source, self.source_name, stats)):
            if by_file or index % world_size == rank:
                yield Document(text=record.text, id=f"{record.path}:{record.line}",
                               metadata={"source": self.source_name})
        if by_file or rank == 0:  # when every task reads everything, one of them reports what was skipped
            self.stat_update("empty", value=stats.empty)
            for reason, count in stats.skipped.items():
                self.stat_update(f"skipped_{reason}", value=count)


class IntermediateReader(JsonlReader):
    """datatrove's JsonlReader for the pipeline's own intermediate files. No file at all is not an error here:
    it means that every document was dropped before deduplication."""

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if not self.data_folder.list_files():
            return
        yield from super().run(data, rank, world_size)
