"""BM25 (Okapi) over a folder of text files: a real retriever with no server.

Documents are split into paragraph passages at load time so that what rag
returns is a useful slice, not a whole file. Scoring is the classic
k1/b formulation with the Lucene-style idf that never goes negative.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from mpipeline.errors import ConfigError
from mpipeline.messages import Passage

_WORD = re.compile(r"\w+", re.UNICODE)
_SUFFIXES = (".txt", ".md")
K1 = 1.5
B = 0.75


def tokenize(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class BM25Index:
    def __init__(self, passages: list[tuple[str, str]]) -> None:
        self._passages = passages
        self._tfs = [Counter(tokenize(text)) for _, text in passages]
        self._lens = [sum(tf.values()) for tf in self._tfs]
        n = len(passages)
        self._avg = (sum(self._lens) / n) if n else 0.0
        df: Counter[str] = Counter()
        for tf in self._tfs:
            df.update(tf.keys())
        self._idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
        self._postings: dict[str, list[int]] = {}
        for i, tf in enumerate(self._tfs):
            for t in tf:
                self._postings.setdefault(t, []).append(i)

    @classmethod
    def from_folder(cls, folder: Path) -> BM25Index:
        """Index every .txt/.md file under ``folder``, one passage per paragraph.

        :raises ConfigError: when the folder does not exist.
        """
        if not folder.is_dir():
            raise ConfigError(f"stages.rag.documents: {folder} is not a folder")
        passages: list[tuple[str, str]] = []
        for path in sorted(folder.rglob("*")):
            if path.suffix in _SUFFIXES and path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
                source = str(path.relative_to(folder))
                paragraphs = (p.strip() for p in re.split(r"\n\s*\n", text))
                passages.extend((source, p) for p in paragraphs if p)
        return cls(passages)

    def __len__(self) -> int:
        return len(self._passages)

    def search(self, query: str, k: int) -> list[Passage]:
        scores: dict[int, float] = {}
        for term in set(tokenize(query)):
            idf = self._idf.get(term)
            if idf is None:
                continue
            for i in self._postings[term]:
                tf = self._tfs[i][term]
                norm = tf + K1 * (1 - B + B * self._lens[i] / self._avg)
                scores[i] = scores.get(i, 0.0) + idf * tf * (K1 + 1) / norm
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [
            Passage(source=self._passages[i][0], text=self._passages[i][1], score=s)
            for i, s in best
        ]
