"""MinHash near-duplicate removal with datatrove's four steps, keeping each cluster's size for rehydration.

    1. MinhashDedupSignature  (one task per input shard)  signatures of word n-grams, split into buckets
    2. MinhashDedupBuckets    (one task per bucket)       documents whose signatures collide in a bucket
    3. MinhashDedupCluster    (one task)                  union-find over the pairs: clusters, their sizes
    4. ClusterSizeDedupFilter (one task per input shard)  keeps one document per cluster, labelled with its size

Steps 1 and 4 must read the same shards in the same order (same reader, same number of tasks): step 3 names
documents by (shard, index).
"""

from __future__ import annotations

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from graftlm.curate.config import MinhashSettings
from graftlm.curate.filters import word_splitter


def minhash_config(settings: MinhashSettings) -> MinhashConfig:
    return MinhashConfig(n_grams=settings.n_grams, num_buckets=settings.num_buckets,
                         hashes_per_bucket=settings.hashes_per_bucket, seed=settings.seed,
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))  # FineWeb2's: fewer collisions


class WhitespaceWords(WordTokenizer):
    """Words are what spaces separate (`minhash.words: whitespace`). MinHash only needs stable units: its text is
    already lower-cased and stripped of punctuation."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def signature_step(folder: str, settings: MinhashSettings, lang: str) -> MinhashDedupSignature:
    words = WhitespaceWords() if settings.words == "whitespace" else word_splitter(lang)
    return MinhashDedupSignature(output_folder=f"{folder}/signatures", config=minhash_config(settings),
                                 language=words)


def buckets_step(folder: str, config: MinhashConfig) -> MinhashDedupBuckets:
    return MinhashDedupBuckets(input_folder=f"{folder}/signatures", output_folder=f"{folder}/buckets", config=config)


def cluster_step(folder: str, config: MinhashConfig) -> MinhashDedupCluster:
    return MinhashDedupCluster(input_folder=f"{folder}/buckets", output_folder=f"{folder}/remove_ids",
                               config=config, save_cluster_size=True)


class ClusterSizeDedupFilter(MinhashDedupFilter):
    """datatrove's step 4 with `minhash_cluster_size` on every kept document.

    datatrove only reads a shard's cluster sizes when the shard also lost a document; a shard whose documents are
    all the kept members of their clusters would come out without sizes (and without rehydration). An empty
    removal list makes datatrove read them.
    """

    def __init__(self, folder: str, exclusion_writer=None):
        super().__init__(input_folder=f"{folder}/remove_ids", exclusion_writer=exclusion_writer,
                         load_cluster_sizes=True)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        removals, sizes = f"{rank:06d}.remove", f"{rank:06d}.sizes"
        if self.data_folder.isfile(sizes) and not self.data_folder.isfile(removals):
            self.data_folder.open(removals, "wb").close()
        yield from super().run(data, rank, world_size)
