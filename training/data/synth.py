"""A small generated language, so the project trains and tests without any corpus.

The grammar is unambiguous: every sentence has exactly one derivation, so the
probability of a sentence (with its `<eos>`) is the product of the choices that
produced it, and the true perplexity of any file of sentences is known.

Agreement reaches across a relative clause: the main verb agrees in number and
in noun class with the subject noun, several tokens back
("the old dogs that watch a red car sleep"), so a bigram model cannot do well
and a recurrent model with memory can.

`write_corpus` writes the same sentences in the formats of the real corpora:
LM text (one sentence per line), CoNLL-U (UPOS), BIO columns and labelled lines.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

DETERMINERS = {"sg": ["the", "a", "this", "every"], "pl": ["the", "these", "some", "many"]}
NOUNS = {  # class -> (singular, plural) pairs
    "animate": [("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("farmer", "farmers"),
                ("child", "children"), ("teacher", "teachers")],
    "inanimate": [("stone", "stones"), ("car", "cars"), ("river", "rivers"), ("tree", "trees"),
                  ("house", "houses"), ("machine", "machines")],
}
INTRANSITIVE = {
    "animate": [("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("laughs", "laugh"),
                ("waits", "wait")],
    "inanimate": [("falls", "fall"), ("shines", "shine"), ("breaks", "break"), ("moves", "move"),
                  ("rusts", "rust")],
}
TRANSITIVE = {
    "animate": [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("finds", "find"),
                ("watches", "watch")],
    "inanimate": [("hits", "hit"), ("blocks", "block"), ("covers", "cover")],
}
ADJECTIVES = {"positive": ["happy", "kind", "bright", "gentle"],
              "negative": ["angry", "cruel", "dark", "broken"],
              "neutral": ["big", "small", "old", "young"]}
ADVERBS = {"positive": ["happily", "gladly"], "negative": ["sadly", "badly"],
           "neutral": ["today", "again"]}
NAMES = ["alice", "bob", "carol", "dave"]
SURNAMES = ["smith", "jones", "brown"]
PLACES = [["paris"], ["london"], ["rome"], ["new", "york"], ["san", "francisco"]]

P_NAME_SUBJECT, P_NAME_OBJECT, P_SURNAME = 0.15, 0.1, 0.4
P_ADJ, P_RELATIVE, P_TRANSITIVE, P_PLACE, P_ADVERB = 0.4, 0.5, 0.5, 0.25, 0.3

_POLARITY = {w: pol for table in (ADJECTIVES, ADVERBS) for pol, ws in table.items() for w in ws}


@dataclass
class Sentence:
    words: list[str] = field(default_factory=list)
    upos: list[str] = field(default_factory=list)
    bio: list[str] = field(default_factory=list)
    logprob: float = 0.0  # natural log of P(words, <eos>)

    def add(self, word: str, upos: str, bio: str = "O") -> None:
        self.words.append(word)
        self.upos.append(upos)
        self.bio.append(bio)

    @property
    def label(self) -> str | None:
        """Sentiment: the polarity of the last positive or negative word, if any."""
        polar = [_POLARITY[w] for w in self.words if _POLARITY.get(w, "neutral") != "neutral"]
        return polar[-1] if polar else None


class Grammar:
    """Draws sentences and accumulates the log-probability of each choice."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _flip(self, s: Sentence, p: float) -> bool:
        yes = self.rng.random() < p
        s.logprob += math.log(p if yes else 1.0 - p)
        return yes

    def _pick(self, s: Sentence, options: list):
        s.logprob -= math.log(len(options))
        return self.rng.choice(options)

    def _name(self, s: Sentence) -> None:
        s.add(self._pick(s, NAMES), "PROPN", "B-PER")
        if self._flip(s, P_SURNAME):
            s.add(self._pick(s, SURNAMES), "PROPN", "I-PER")

    def _noun_phrase(self, s: Sentence, p_name: float, relative: bool) -> tuple[str, int]:
        """Returns (class, number index 0=sg 1=pl) of the head, for agreement."""
        if self._flip(s, p_name):
            self._name(s)
            return "animate", 0
        number = self._pick(s, [0, 1])
        noun_class = self._pick(s, ["animate", "inanimate"])
        s.add(self._pick(s, DETERMINERS["sg" if number == 0 else "pl"]), "DET")
        if self._flip(s, P_ADJ):
            s.add(self._pick(s, [w for ws in ADJECTIVES.values() for w in ws]), "ADJ")
        s.add(self._pick(s, NOUNS[noun_class])[number], "NOUN")
        if relative and self._flip(s, P_RELATIVE):
            s.add("that", "PRON")
            self._verb_phrase(s, noun_class, number)
        return noun_class, number

    def _verb_phrase(self, s: Sentence, noun_class: str, number: int) -> None:
        if self._flip(s, P_TRANSITIVE):
            s.add(self._pick(s, TRANSITIVE[noun_class])[number], "VERB")
            self._noun_phrase(s, P_NAME_OBJECT, relative=False)
        else:
            s.add(self._pick(s, INTRANSITIVE[noun_class])[number], "VERB")

    def sentence(self) -> Sentence:
        s = Sentence()
        noun_class, number = self._noun_phrase(s, P_NAME_SUBJECT, relative=True)
        self._verb_phrase(s, noun_class, number)
        if self._flip(s, P_PLACE):
            s.add("in", "ADP")
            place = self._pick(s, PLACES)
            for i, word in enumerate(place):
                s.add(word, "PROPN", "B-LOC" if i == 0 else "I-LOC")
        if self._flip(s, P_ADVERB):
            s.add(self._pick(s, [w for ws in ADVERBS.values() for w in ws]), "ADV")
        return s

    def agreement_probe(self) -> tuple[str, str]:
        """A sentence whose subject has a relative clause with an object of the other number
        (an attractor), and the same sentence with the main verb's number flipped."""
        while True:
            s = self.sentence()
            verbs = [i for i, tag in enumerate(s.upos) if tag == "VERB"]
            if "that" not in s.words or len(verbs) < 2 or s.upos[0] != "DET":
                continue
            rel_verb, main_verb = verbs[0], verbs[-1]
            subject_plural = s.words[s.upos.index("NOUN")] in _PLURAL_NOUNS
            objects = [w for w in s.words[rel_verb + 1 : main_verb] if w in _ALL_NOUNS]
            if not objects or (objects[0] in _PLURAL_NOUNS) == subject_plural:
                continue
            flipped = list(s.words)
            flipped[main_verb] = _OTHER_FORM[s.words[main_verb]]
            return " ".join(s.words), " ".join(flipped)


_PLURAL_NOUNS = {pl for pairs in NOUNS.values() for _, pl in pairs}
_ALL_NOUNS = _PLURAL_NOUNS | {sg for pairs in NOUNS.values() for sg, _ in pairs}
_OTHER_FORM = {a: b for table in (INTRANSITIVE, TRANSITIVE) for pairs in table.values()
               for sg, pl in pairs for a, b in ((sg, pl), (pl, sg))}

SPLITS = {"train": 30000, "valid": 2000, "test": 2000}
TAGGED_SPLITS = {"train": 6000, "valid": 600, "test": 600}


def write_corpus(out: str | Path, seed: int = 1234, scale: float = 1.0) -> dict[str, int]:
    """Writes every format under `out`; returns the number of sentences per file."""
    out = Path(out)
    for sub in ("lm", "pos", "ner", "cls"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    grammar = Grammar(seed)
    for split, n in SPLITS.items():
        sentences = [grammar.sentence() for _ in range(max(1, int(n * scale)))]
        lm = out / "lm"
        (lm / f"{split}.txt").write_text("".join(f" {' '.join(s.words)} \n" for s in sentences))
        (lm / f"{split}.logprob").write_text("".join(f"{s.logprob:.10f}\n" for s in sentences))
        counts[f"lm/{split}.txt"] = len(sentences)
    probes = [grammar.agreement_probe() for _ in range(max(1, int(400 * scale)))]
    (out / "lm" / "probes.tsv").write_text("".join(f"{good}\t{bad}\n" for good, bad in probes))
    counts["lm/probes.tsv"] = len(probes)
    for split, n in TAGGED_SPLITS.items():
        sentences = [grammar.sentence() for _ in range(max(1, int(n * scale)))]
        _write_conllu(out / "pos" / f"{split}.conllu", sentences, split)
        (out / "ner" / f"{split}.conll").write_text(
            "".join("".join(f"{w}\t{t}\n" for w, t in zip(s.words, s.bio)) + "\n"
                    for s in sentences)
        )
        labelled = []
        while len(labelled) < len(sentences):
            s = grammar.sentence()
            if s.label is not None:
                labelled.append(f"{s.label} {' '.join(s.words)}\n")
        (out / "cls" / f"{split}.txt").write_text("".join(labelled))
        counts.update({f"pos/{split}.conllu": len(sentences), f"ner/{split}.conll": len(sentences),
                       f"cls/{split}.txt": len(labelled)})
    (out / "README.md").write_text(_README.format(seed=seed))
    return counts


def _write_conllu(path: Path, sentences: list[Sentence], split: str) -> None:
    lines = []
    for n, s in enumerate(sentences, 1):
        lines += [f"# sent_id = synth-{split}-{n}", f"# text = {' '.join(s.words)}"]
        lines += [f"{i}\t{w}\t{w}\t{tag}\t_\t_\t_\t_\t_\t_" for i, (w, tag) in
                  enumerate(zip(s.words, s.upos), 1)]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


_README = """# A generated corpus (seed {seed})

Written by `recur data synth`. Every sentence comes from one unambiguous probabilistic grammar
(training/data/synth.py), so `lm/*.logprob` holds each sentence's exact natural-log probability,
`<eos>` included, and the true perplexity of a file is exp(-sum(logprob) / (tokens + sentences)).

- lm/{{train,valid,test}}.txt: one sentence per line (Penn Treebank style); lm/probes.tsv:
  grammatical and ungrammatical main-verb agreement across a relative clause.
- pos/*.conllu: CoNLL-U with UPOS tags. ner/*.conll: token TAB BIO tag (PER, LOC).
- cls/*.txt: `label sentence`, the label being the polarity of the last polar word.
"""


def true_perplexity(prefix: str | Path) -> float:
    """The generated language's exact perplexity on PREFIX.txt, from PREFIX.logprob."""
    logprobs = [float(x) for x in Path(f"{prefix}.logprob").read_text().split()]
    tokens = sum(len(line.split()) + 1 for line in Path(f"{prefix}.txt").read_text().splitlines())
    return math.exp(-sum(logprobs) / tokens)


if __name__ == "__main__":
    import sys

    for prefix in sys.argv[1:]:
        print(f"true perplexity of the generated language on {prefix}.txt: "
              f"{true_perplexity(prefix):.3f}")
