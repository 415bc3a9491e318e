"""lm-eval (``pip install "diffmoe[eval]"``) over a diffmoe run: :class:`DiffMoELM` and :func:`run_tasks`.

Scoring a continuation (``loglikelihood``, multiple choice) routes, in models with routing modes,
on the context by default (``routing="prompt"``: the paper's inference mode; most task items are shorter
than one routing segment, so under ``segment`` routing they would all fall in the first segment and never
be routed). ``routing="segment"`` scores them as in training, and then matches the exported model (the HF
path). Rolling log-likelihood (perplexity) always uses segment routing over windows of ``max_seq_len``
with the end-of-document id as prefix; generation routes on the prompt (:func:`generate_stream`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ROUTINGS = ("prompt", "segment")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM
    except ImportError as e:
        raise ImportError(f'lm-eval is not installed ({e}): pip install "diffmoe[eval]"') from None
    return lm_eval, TemplateLM


def make_lm(
    run_dir,
    checkpoint=None,
    routing: str = "prompt",
    batch_size: int = 8,
    device: str = "cpu",
    data: str | os.PathLike | None = None,
):
    """A :class:`DiffMoELM` (the class is defined on first use, so that lm-eval is imported lazily)."""
    return _adapter_class()(
        run_dir, checkpoint=checkpoint, routing=routing, batch_size=batch_size, device=device, data=data
    )


_CLASS = None


def _adapter_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = _define()
    return _CLASS


def _define():
    _, TemplateLM = _lm_eval()
    from lm_eval import utils

    from ..data.store import read_manifest
    from ..data.tokenizer import load_tokenizer
    from ..eval.generate import generate_stream
    from ..runs import load_run

    class DiffMoELM(TemplateLM):
        """lm-eval's ``TemplateLM`` over a diffmoe run (its newest checkpoint and its dataset's tokenizer)."""

        def __init__(
            self, run_dir, checkpoint=None, routing: str = "prompt", batch_size: int = 8, device: str = "cpu", data=None
        ):
            super().__init__()
            if routing not in ROUTINGS:
                from ..schema import ConfigError

                raise ConfigError(f"invalid routing={routing!r}: choose one of {', '.join(ROUTINGS)}")
            self.cfg, self.model, self.checkpoint = load_run(run_dir, checkpoint, device)
            path = data or self.cfg.data.primary_path
            self.tokenizer = load_tokenizer(path)
            self._eot = int(read_manifest(path)["tokenizer"]["eod_id"])
            self.routing = routing
            self.batch_size = int(batch_size)
            self.max_length = self.cfg.model.max_seq_len
            self._device = next(self.model.parameters()).device
            self.has_modes = any(f.capabilities.routing_modes for f in self.model.ffns())

        @property
        def eot_token_id(self) -> int:
            return self._eot

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.tokenizer.encode(string, add_special_tokens=False).ids

        def tok_decode(self, ids) -> str:
            return self.tokenizer.decode(list(ids), skip_special_tokens=False)

        # ------------------------------------------------------------------ scoring
        @torch.no_grad()
        def _score(self, items, routing: str) -> list[tuple[float, bool]]:
            """items: (context ids, continuation ids); same rules as lm-eval's HF model: the last
            max_length + 1 tokens, the input drops the last one. Under ``prompt`` routing each item is
            routed on its (kept) context, so items are batched only with equal context lengths."""
            prepared = []
            for ctx, cont in items:
                whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
                inp = whole[:-1]
                n_cont = min(len(cont), len(inp))
                n_ctx = max(len(inp) - n_cont + 1, 1)  # positions of the input that are context
                prepared.append((inp, n_cont, n_ctx))
            order = sorted(range(len(prepared)), key=lambda i: (-len(prepared[i][0]), i))
            if routing == "prompt" and self.has_modes:
                groups: dict[int, list[int]] = {}
                for i in order:
                    groups.setdefault(prepared[i][2], []).append(i)
                batches = [
                    g[k : k + self.batch_size] for g in groups.values() for k in range(0, len(g), self.batch_size)
                ]
            else:
                batches = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
            out: list[tuple[float, bool] | None] = [None] * len(items)
            with self.model.inference(routing if self.has_modes else None):
                for batch in batches:
                    width = max(len(prepared[i][0]) for i in batch)
                    ids = torch.full((len(batch), width), self._eot, dtype=torch.long)
                    for r, i in enumerate(batch):  # right padding: causal, so the padding is never seen
                        ids[r, : len(prepared[i][0])] = torch.tensor(prepared[i][0])
                    prompt_len = prepared[batch[0]][2] if routing == "prompt" and self.has_modes else None
                    logp = F.log_softmax(self.model(ids.to(self._device), prompt_len=prompt_len).float(), -1)
                    for r, i in enumerate(batch):
                        inp, n_cont, _ = prepared[i]
                        target = torch.tensor(
                            items[i][1][-n_cont:] if n_cont else [], dtype=torch.long, device=logp.device
                        )
                        rows = logp[r, len(inp) - n_cont : len(inp)]
                        greedy = bool((rows.argmax(-1) == target).all())
                        out[i] = (float(rows.gather(-1, target[:, None]).sum()), greedy)
            return out

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return self._score([(ctx, cont) for _, ctx, cont in requests], self.routing)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for k, req in enumerate(requests):
                (string,) = req.args
                for ctx, cont in map(
                    utils.make_disjoint_window,
                    utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                ):
                    windows.append((ctx, cont))
                    owner.append(k)
            scores = self._score(windows, "segment")
            totals = [0.0] * len(requests)
            for k, (logp, _) in zip(owner, scores):
                totals[k] += logp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            results = []
            for req in requests:
                context, gen_kwargs = req.args
                kwargs = dict(gen_kwargs or {})
                until = kwargs.get("until") or [self.tok_decode([self._eot])]
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 256))
                ids = self.tok_encode(context) or [self._eot]
                max_new = max(1, min(max_new, self.max_length - 1))
                ids = ids[-(self.max_length - max_new) :]
                new: list[int] = []
                text = ""
                for token in generate_stream(self.model, torch.tensor([ids]), max_new, routing="prompt"):
                    t = int(token[0])
                    if t == self._eot:
                        break
                    new.append(t)
                    text = self.tok_decode(new)
                    if any(s in text for s in until):
                        break
                for s in until:
                    text = text.split(s)[0]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                results.append(text)
            return results

    return DiffMoELM


def run_tasks(
    run_dir,
    tasks,
    include_path=None,
    routing: str = "prompt",
    limit=None,
    checkpoint=None,
    batch_size: int = 8,
    device: str = "cpu",
    data=None,
    log_samples: bool = False,
) -> dict:
    """``lm_eval.simple_evaluate`` of a diffmoe run on ``tasks`` (names, or a comma-separated string);
    ``include_path``: a folder of task YAMLs (e.g. from ``diffmoe tasks build``). Returns lm-eval's
    results dict (``results[task][metric]``; ``samples[task]`` with ``log_samples``)."""
    lm_eval, _ = _lm_eval()
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    model = make_lm(run_dir, checkpoint, routing, batch_size, device, data)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    return lm_eval.simple_evaluate(
        model=model, tasks=names, task_manager=manager, limit=limit, log_samples=log_samples, bootstrap_iters=0
    )
