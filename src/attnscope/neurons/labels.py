"""Labels for neurons, from evidence that is independent of the texts the neurons are evaluated on.

A label is a claim about a neuron's *token evidence* (its highest-scoring tokens), and each label names
the evidence that supports it:

* ``script``: the Unicode script of the tokens (e.g. Cyrillic), when it is not Latin;
* ``lexicon``: hand-written word lists of a language, genre or topic (no names or words taken from the
  evaluation texts: the lists hold function words, keywords and common topic words);
* ``spelling pairs``: British/Commonwealth vs American spelling, from a list of word *pairs* whose
  spellings differ (colour/color, realise/realize, centre/center, ...).  A word spelled the same in both
  dialects (water, after, otherwise, promise) is no evidence for either.

No label is taken from the bundled texts: they are the evaluation texts.  Whether a label is *true* of a
neuron's behaviour is a separate, measured question (``attnscope.neurons.evaluation``: label precision against
the demo model's known contexts); dialects have no such ground truth here, so a dialect label stays a
statement about token evidence.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

LEXICONS: dict[str, set[str]] = {
    "English function words": set("the and of to a in that is was he for it with as his on be at by i this had not "
                                  "are but from or have an they which you were her she all would there their we him "
                                  "been has when who will more no if out so said what up its about into than them can "
                                  "only".split()),
    "Spanish": set("de la que el en y los del se las por un para con no una su al lo como más pero sus le ya este sí "
                   "porque esta entre cuando muy sin sobre también me hasta hay donde quien desde todo nos durante "
                   "todos uno les ni contra otros ese eso ante ellos esto antes algunos qué unos yo otro otras otra él "
                   "tanto esa estos mucho quienes nada muchos cual poco ella estar estas algo es son ser hace tiene "
                   "vida amor hombre mujer dios siempre nunca bien mal día hacer puede".split()),
    "German": set("der die und den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden aus "
                  "er hat dass daß sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur "
                  "oder aber vor zur bis mehr durch man sein wurde sei ich du wenn was kann mir mich dich nichts immer "
                  "ganz schon wir ihr ihm ihn gibt keine kein gut leben mann frau welt liebe gott heute".split()),
    "Python code": set("def self return import from class if else elif none true false for while try except raise with "
                       "as lambda yield pass not and or is __init__ args kwargs isinstance len str int print assert "
                       "dict list tuple object super".split()),
    "Early Modern English": set("thou thee thy thine hath doth art ye hast shalt wilt nay ay 'tis ere whence thence "
                                "hither dost methinks".split()),
    "government / politics": set("congress government states united nation national public people president federal "
                                 "law country citizens policy treaty revenue department administration legislation act "
                                 "economic program tax constitution secretary military".split()),
    "sea / ships": set("whale ship sea captain deck boat sail sailors harpoon ocean crew voyage mast whales boats "
                       "sailor ships waves".split()),
}
CHAR_HINTS = {"Spanish": set("ñáéíóú¿¡"), "German": set("äöüß")}
# British/Commonwealth -> American spellings of the same word (stems: a token matches when it starts with
# the stem and is at least as long).  Only words whose spelling differs between the dialects.
SPELLING_PAIRS: dict[str, str] = {
    "colour": "color", "favour": "favor", "honour": "honor", "labour": "labor", "neighbour": "neighbor",
    "behaviour": "behavior", "harbour": "harbor", "humour": "humor", "rumour": "rumor", "vapour": "vapor",
    "flavour": "flavor", "endeavour": "endeavor", "savour": "savor", "vigour": "vigor", "rigour": "rigor",
    "centre": "center", "theatre": "theater", "litre": "liter", "fibre": "fiber", "sombre": "somber",
    "realis": "realiz", "organis": "organiz", "recognis": "recogniz", "apologis": "apologiz", "criticis": "criticiz",
    "civilis": "civiliz", "authoris": "authoriz", "characteris": "characteriz", "emphasis": "emphasiz",
    "memoris": "memoriz", "modernis": "moderniz", "specialis": "specializ", "summaris": "summariz",
    "utilis": "utiliz", "analys": "analyz", "paralys": "paralyz", "catalogue": "catalog", "programme": "program",
    "defence": "defense", "offence": "offense", "travelled": "traveled", "travelling": "traveling",
    "cancelled": "canceled", "cancelling": "canceling", "jewellery": "jewelry", "grey": "gray", "cheque": "check",
    "tyre": "tire", "aluminium": "aluminum", "plough": "plow", "sceptic": "skeptic", "manoeuvr": "maneuver",
    "aeroplane": "airplane", "whilst": "while", "amongst": "among", "mum": "mom", "pyjama": "pajama",
}
# stems that would also match words spelled the same in both dialects: (stem, words to exclude)
_NOT_DIALECT = {"emphasiz": set(), "emphasis": {"emphasis"}, "analys": {"analysis", "analyst", "analysts", "analyses"},
                "check": {"check", "checks", "checked", "checking"}, "tire": {"tire", "tired", "tires"},
                "program": {"program", "programs"}, "while": {"while"}, "among": {"among"}, "mom": {"moment"}}
# derived words spelled the same in both dialects (humorous, honorary, laboratory, vigorous, Colorado)
_SAME_IN_BOTH = re.compile(r"or(ous|ously|ary|arium|atory|ado|ation|ations)$")
_WHOLE_WORD = {"mum", "mom", "grey", "gray", "tyre", "tire", "check", "cheque"}
BRITISH, AMERICAN = "British/Commonwealth spelling", "American spelling"


@dataclass
class Label:
    text: str  # what the token evidence is, e.g. "German"
    evidence: str  # which independent evidence: "script", "lexicon" or "spelling pairs"
    n_hits: int  # tokens (of those given) that the evidence covers
    n_tokens: int


def clean(tok: str) -> str:
    return tok.replace("Ġ", " ").replace("▁", " ").replace("##", "").replace("Ċ", "\n").strip().lower()


def _script(text: str) -> str | None:
    names = [unicodedata.name(c, "").split(" ")[0] for c in text if c.isalpha()]
    return max(set(names), key=names.count) if names else None


def dialect(word: str) -> str | None:
    """``BRITISH`` or ``AMERICAN`` when ``word`` is one spelling of a pair that differs between dialects."""
    w = clean(word)
    if not w.isalpha() or _SAME_IN_BOTH.search(w):
        return None
    for side, stems in ((BRITISH, SPELLING_PAIRS.keys()), (AMERICAN, SPELLING_PAIRS.values())):
        for stem in stems:
            if w.startswith(stem) and w not in _NOT_DIALECT.get(stem, ()) and len(w) <= len(stem) + 5:
                if stem in _WHOLE_WORD and w not in (stem, stem + "s"):
                    continue  # short stems: the word itself (or its plural) only
                return side
    return None


def _lexicon_hits(name: str, lex: set[str], words: list[str]) -> int:
    n = sum(w in lex for w in words)
    if name in CHAR_HINTS:
        n += sum(any(c in CHAR_HINTS[name] for c in w) and w not in lex for w in words)
    if name == "Python code":  # identifier- and punctuation-shaped tokens
        n += sum(bool(re.search(r"[_(){}\[\]=:.#]|^\s{2,}", w)) and w not in lex for w in words)
    return n


def auto_label(tokens: list[str]) -> Label | None:
    """A label for a list of tokens, when one kind of evidence covers at least 20% of them (and 4) and
    beats the runner-up by half again; else ``None``.  Non-Latin scripts need 40%."""
    words = [clean(t) for t in tokens if clean(t)]
    if not words:
        return None
    scripts = [s for s in (_script(w) for w in words) if s]
    if scripts:
        top = max(set(scripts), key=scripts.count)
        if top != "LATIN" and scripts.count(top) >= max(4, 0.4 * len(words)):
            return Label(f"{top.title()} script", "script", scripts.count(top), len(words))
    hits = {(name, "lexicon"): _lexicon_hits(name, lex, words) for name, lex in LEXICONS.items()}
    sides = [dialect(w) for w in words]
    for side in (BRITISH, AMERICAN):
        hits[(side, "spelling pairs")] = sides.count(side)
    ranked = sorted(hits.items(), key=lambda kv: -kv[1])
    ((best, evidence), nb), (_, n2) = ranked[0], ranked[1]
    if nb >= max(4, 0.2 * len(words)) and nb >= 1.5 * n2:
        return Label(best, evidence, nb, len(words))
    return None


# The demo model's contexts a label can be checked against (its ground truth): label -> bundled text(s).
LABEL_CONTEXTS: dict[str, tuple[str, ...]] = {
    "Spanish": ("es_fortunes",), "German": ("de_fortunes",), "Python code": ("code_python",),
    "Early Modern English": ("en_shakespeare", "en_milton"), "sea / ships": ("en_moby_dick",),
    "government / politics": ("en_speeches_1790_1899", "en_speeches_1900_2016"),
}
