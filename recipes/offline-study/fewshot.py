"""Few-shot prompts whose examples cannot leak into every output: each sentence gets its own two example pairs.

    python fewshot.py SHARED --out PROMPTS.jsonl [--shots 2] [--seed 0]

With two fixed example pairs, whatever Gemma copies from them (a name, a phrase) lands in hundreds of outputs and
moves the corpus score in an unknown direction. Here sentence i of the study's dev set (the first 500 newstest2013
sentences of SHARED = ../shared/data) gets examples drawn from the whole training pool (every newstest year of
SHARED's train folder, in file-name order) with a
seeded generator of its own (seed, i), among pairs of 15 to 40 English words whose German side is 0.7 to 1.5 times
as long (short examples make the 270M base model copy the example; badly aligned pairs teach the wrong task). A
leak can still happen on a line, but it differs from line to line, and `rescore.py` counts it against each line's own
examples. One JSON record a line: src, tgt, and ex1_en, ex1_de, ex2_en, ... for the recipe's template.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MIN_WORDS, MAX_WORDS = 15, 40
# The two fixed example pairs of the recipe's `llm` row (FEWSHOT in the Makefile: newstest2012 lines 4 and 6), which
# rescore.py counts leaks from.
FIXED = [
    ("In October, Tymoshenko was sentenced to seven years in prison for entering into what was reported to be a "
     "disadvantageous gas deal with Russia.",
     "Timoshenko war im Oktober wegen des Abschlusses eines angeblich nachteiligen Vertrags mit Russland über den "
     "Einkauf von Erdgas zu sieben Jahren Haft verurteilt worden."),
    ("Tymoshenko claims the verdict is a political revenge of the regime; in the West, the trial has also evoked "
     "suspicion of being biased.",
     "Timoshenko selbst bezeichnet das Urteil als politische Rache des Regimes und auch im Westen ließ der Prozess den "
     "Verdacht der Voreingenommenheit des Gerichts aufkommen."),
]


def read_lines(path: Path) -> list[str]:
    """A text file's lines as the toolkit reads them: split at line feeds only (str.splitlines would also split at
    U+2028 and the like, which a few newstest sentences contain, and misalign the two sides)."""
    text = path.read_text(encoding="utf-8")
    return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")] if text else []


def usable_pairs(pool_en: list[str], pool_de: list[str]) -> list[tuple[str, str]]:
    """The pool's pairs that may serve as examples (length and length-ratio limits above)."""
    pairs = []
    for en, de in zip(pool_en, pool_de):
        n, m = len(en.split()), len(de.split())
        if MIN_WORDS <= n <= MAX_WORDS and 0.7 <= m / n <= 1.5:
            pairs.append((en.strip(), de.strip()))
    return pairs


def examples_for(pairs: list[tuple[str, str]], index: int, shots: int, seed: int) -> list[tuple[str, str]]:
    """Sentence `index`'s example pairs: the same for the same (seed, index), whatever else is drawn."""
    return random.Random(f"{seed}:{index}").sample(pairs, shots)


def records(pool_en: list[str], pool_de: list[str], sources: list[str], references: list[str], *, shots: int = 2,
            seed: int = 0) -> list[dict]:
    """One record per source sentence: id, src, tgt and its own example pairs."""
    if len(sources) != len(references):
        raise SystemExit(f"error: {len(sources)} sources, {len(references)} references")
    pairs = usable_pairs(pool_en, pool_de)
    out = []
    for i, (s, t) in enumerate(zip(sources, references)):
        record = {"id": str(i), "src": s, "tgt": t}
        for j, (en, de) in enumerate(examples_for(pairs, i, shots, seed), 1):
            record[f"ex{j}_en"], record[f"ex{j}_de"] = en, de
        out.append(record)
    return out


def whole_pool(shared: Path) -> tuple[list[str], list[str]]:
    """Every training pair of SHARED (the recipe's pool with MAX_TRAIN=0), English and German lines."""
    files = sorted((shared / "translation" / "en-de" / "train").glob("*.en"))
    return ([line for f in files for line in read_lines(f)],
            [line for f in files for line in read_lines(f.with_suffix(".de"))])


def dev500(shared: Path) -> tuple[list[str], list[str]]:
    """The study's dev set: the first 500 newstest2013 sentences and their references."""
    dev = shared / "translation" / "en-de" / "dev"
    return read_lines(dev / "newstest2013.en")[:500], read_lines(dev / "newstest2013.de")[:500]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = records(*whole_pool(args.shared), *dev500(args.shared), shots=args.shots, seed=args.seed)
    tmp = args.out.with_suffix(args.out.suffix + ".new")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
