"""EleutherAI lm-evaluation-harness tasks on an HMT model.

:class:`HMTEvalWrapper` is an ``lm_eval.api.model.LM`` (not an ``HFLM``: that one loads a
Hugging Face model in its constructor, ``gpt2`` by default, which needs the hub). Every
request is read through HMT segment by segment, so contexts of any length fit:

* ``loglikelihood``: the context is read in calls of ``chunk_segments`` segments up to the
  segment holding the last context token; that segment and the continuation are read in one
  call with logits. The state after the shared prefix is kept, so the choices of a
  multiple-choice question re-read only their own segment.
* ``loglikelihood_rolling``: the whole document, streamed, every token scored once (HMT has
  no context window to roll).
* ``generate_until``: :class:`~hmt_plugin.generation.HMTGenerator` (greedy unless the task
  samples), stopping at ``until`` strings, the tokenizer's stop tokens or ``max_gen_toks``.

Run from the eval recipe (``lm_eval:`` section of the config) or directly::

    from hmt_plugin.eval.lm_eval_harness import HMTEvalWrapper, run_lm_eval
    results = run_lm_eval(HMTEvalWrapper(model, tokenizer), tasks=["babilong_qa1"],
                          metadata={"max_seq_lengths": "32k"})

Long-context tasks that ship with lm_eval 0.4.13 (their datasets come from the Hugging Face
hub: download once, then ``HF_DATASETS_OFFLINE=1`` works from the cache)::

    # BABILong, QA1-5 with facts hidden in 32k tokens of PG-19 text (0k..128k available)
    hmt-tune run hmt_eval --config llama2_7b/hmt_eval_pg19 \\
        context_lengths=null document_ppl=false \\
        lm_eval.tasks=[babilong_longctx] 'lm_eval.metadata={max_seq_lengths: 32k}'
    # one task and fewer questions
    ... lm_eval.tasks=[babilong_qa1] lm_eval.limit=100 'lm_eval.metadata={max_seq_lengths: 8k}'
    # RULER needle-in-a-haystack (builds its prompts with a Hugging Face tokenizer)
    ... lm_eval.tasks=[niah_single_1] \\
        'lm_eval.metadata={tokenizer: meta-llama/Llama-2-7b-hf, max_seq_lengths: [4096, 16384]}'
    # LongBench / LongBench v2, SCROLLS, InfiniteBench: lm_eval.tasks=[longbench], [scrolls], ...
    # word/byte perplexity of WikiText-2 documents (loglikelihood_rolling)
    ... lm_eval.tasks=[wikitext]
"""

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval.api.model import LM
from tqdm import tqdm

from hmt_plugin.eval.long_context import reading_mode
from hmt_plugin.generation import HMTGenerator
from hmt_plugin.modules.hmt import HMT


class HMTEvalWrapper(LM):
    """lm-eval's model interface over an :class:`HMT` model and a torchtune tokenizer.

    Args:
        model (HMT): the model (weights loaded).
        tokenizer: a torchtune tokenizer (``encode(text, add_bos, add_eos)``, ``decode``).
        mode (Optional[str]): HMT mode to evaluate in (default: the model's own).
        max_gen_toks (int): default generation budget when a task gives none.
        chunk_segments (int): segments per model call when reading long contexts.
        refresh_recall (bool): the generator's recall policy (see
            :mod:`hmt_plugin.generation.generator`).
        seed (int): seed of the sampler, for tasks that sample.
        progress (bool): show progress bars.
    """

    def __init__(
        self,
        model: HMT,
        tokenizer: Any,
        *,
        mode: Optional[str] = None,
        max_gen_toks: int = 256,
        chunk_segments: int = 16,
        refresh_recall: bool = True,
        seed: int = 1234,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError("lm-eval tasks are text: the config needs a `tokenizer`.")
        self.model = model
        self.tokenizer = tokenizer
        self.mode = mode or model.config.mode
        self.max_gen_toks = max_gen_toks
        self.chunk_segments = chunk_segments
        self.seed = seed
        self.progress = progress
        self._device = next(model.parameters()).device
        self.generator = HMTGenerator(
            model, refresh_recall=refresh_recall, prefill_chunk_segments=chunk_segments
        )
        self._prefix_states: Dict[Tuple[int, ...], Any] = {}

    # ------------------------------------------------------------------ tokens
    @property
    def prefix_token_id(self) -> int:
        """What an empty context starts with: BOS, or EOS for tokenizers without one."""
        bos = getattr(self.tokenizer, "bos_id", None)
        if isinstance(bos, int) and bos >= 0:
            return bos
        return int(self.tokenizer.eos_id)

    @property
    def stop_token_ids(self) -> List[int]:
        stops = getattr(self.tokenizer, "stop_tokens", None)
        return list(stops) if stops else [int(self.tokenizer.eos_id)]

    def tok_encode(self, text: str, bos: bool = True) -> List[int]:
        ids = list(self.tokenizer.encode(text, add_bos=bos, add_eos=False))
        # A tokenizer.json model that never starts with BOS (hf_tokenizer's adds_bos=False,
        # e.g. SmolLM2) reads contexts as transformers gives them; empty ones still get the prefix.
        if bos and ids and not getattr(self.tokenizer, "adds_bos", True):
            return ids
        if bos and (not ids or ids[0] != self.prefix_token_id):
            ids = [
                self.prefix_token_id
            ] + ids  # tokenizers without BOS: start like an empty context
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Context and continuation ids such that ``context + continuation`` tokenizes as one
        text would (trailing spaces of the context move to the continuation, as lm-eval
        expects; SentencePiece glues a space to the following word)."""
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        context = stripped
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation, bos=False)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, self.tok_encode(continuation, bos=False)

    # ------------------------------------------------------------------ scoring
    def _state_after(self, tokens: List[int], upto: int):
        """The HMT state after ``tokens[:upto]`` (``upto`` on a segment boundary), read in
        chunks; the last few prefixes are remembered."""
        if upto == 0:
            return None
        key = tuple(tokens[:upto])
        if key in self._prefix_states:
            return self._prefix_states[key]
        block = self.model.config.tokens_per_segment
        step = self.chunk_segments * block
        ids = torch.tensor([tokens[:upto]], device=self._device)
        state = None
        for start in range(0, upto, step):
            state = self.model(ids[:, start : start + step], state=state, logits="none").state
        if len(self._prefix_states) >= 4:
            self._prefix_states.pop(next(iter(self._prefix_states)))
        self._prefix_states[key] = state
        return state

    def _loglikelihood_tokens(
        self, context: List[int], continuation: List[int]
    ) -> Tuple[float, bool]:
        tokens = context + continuation
        start = len(context)  # first continuation position, >= 1
        block = self.model.config.tokens_per_segment
        boundary = ((start - 1) // block) * block  # segment of the last context token
        state = self._state_after(tokens, boundary)
        tail = torch.tensor([tokens[boundary:]], device=self._device)
        out = self.model(tail, labels=tail, state=state, logits="all")
        cont = tail[0, start - boundary :]
        logprob = -float(out.nll[0, start - boundary :].sum())
        # logits[:, j] predicts tail position j + 1; logits_start is 0 (no pending tokens).
        guesses = out.logits[0, start - boundary - 1 : -1].argmax(dim=-1)
        return logprob, bool((guesses == cont).all())

    @torch.inference_mode()
    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        # Same contexts next to each other, so their prefix state is read once.
        order = sorted(range(len(pairs)), key=lambda i: (pairs[i][0], pairs[i][1]))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        with reading_mode(self.model, self.mode):
            for i in tqdm(order, desc="loglikelihood", disable=not self.progress):
                ctx, cont = pairs[i]
                results[i] = self._loglikelihood_tokens(ctx, cont)
                self.cache_hook.add_partial("loglikelihood", requests[i].args, results[i])
        self._prefix_states.clear()
        return results

    @torch.inference_mode()
    def loglikelihood_rolling(self, requests) -> List[float]:
        out: List[float] = []
        with reading_mode(self.model, self.mode):
            step = self.chunk_segments * self.model.config.tokens_per_segment
            for req in tqdm(requests, desc="loglikelihood_rolling", disable=not self.progress):
                (text,) = req.args
                # Every token is scored, the first one after the prefix (as lm-eval's HFLM).
                tokens = [self.prefix_token_id] + self.tok_encode(text, bos=False)
                ids = torch.tensor([tokens], device=self._device)
                total = torch.zeros((), dtype=torch.float64, device=self._device)
                state = None
                for s in range(0, ids.shape[1], step):
                    piece = ids[:, s : s + step]
                    res = self.model(piece, labels=piece, state=state, logits="none")
                    total += res.nll.sum(dtype=torch.float64)
                    state = res.state
                out.append(-float(total))
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
        return out

    @torch.inference_mode()
    def generate_until(self, requests) -> List[str]:
        out: List[str] = []
        sampler = torch.Generator(device=self._device).manual_seed(self.seed)
        with reading_mode(self.model, self.mode):
            for req in tqdm(requests, desc="generate_until", disable=not self.progress):
                context, gen_kwargs = req.args
                out.append(self._generate_one(context, copy.deepcopy(gen_kwargs or {}), sampler))
                self.cache_hook.add_partial("generate_until", req.args, out[-1])
        return out

    def _generate_one(self, context: str, kwargs: Dict[str, Any], sampler: torch.Generator) -> str:
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k = kwargs.pop("top_k", None)
        if not do_sample:
            temperature, top_k = 0.0, None
        prompt = self.tok_encode(context)
        produced: List[int] = []

        def hit_stop_string(token: int) -> bool:
            produced.append(token)
            if not until:
                return False
            text = self.tok_decode(produced)
            return any(s in text for s in until)

        result = self.generator.generate(
            prompt,
            max_new,
            temperature=temperature,
            top_k=top_k,
            stop_tokens=self.stop_token_ids,
            generator=sampler,
            callback=hit_stop_string,
        )
        text = self.tok_decode(result.sequences()[0])
        for s in until:
            text = text.split(s)[0]
        return text

    # ------------------------------------------------------------------ reporting
    def get_model_info(self) -> Dict[str, Any]:
        cfg = self.model.config
        return {
            "model": "HMT",
            "hmt_mode": self.mode,
            "segment_length": cfg.segment_length,
            "num_sensory": cfg.num_sensory,
            "cache_size": cfg.cache_size,
        }


def run_lm_eval(
    wrapper: HMTEvalWrapper,
    *,
    tasks: Sequence[str],
    include_path: Optional[str] = None,
    include_defaults: bool = True,
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    metadata: Optional[Dict[str, Any]] = None,
    bootstrap_iters: int = 0,
    random_seed: int = 1234,
) -> Dict[str, Any]:
    """``lm_eval.evaluator.simple_evaluate`` on ``wrapper``.

    Args:
        tasks: task or group names (``lm_eval --tasks list`` lists them).
        include_path: a folder of extra task YAML files (local tasks).
        include_defaults: also index lm-eval's built-in tasks (off: faster, local tasks only).
        limit: questions per task (an int, or a fraction when < 1).
        num_fewshot: few-shot examples (default: each task's own).
        metadata: task metadata, e.g. ``{"max_seq_lengths": "32k"}`` for BABILong.
        bootstrap_iters: bootstrap resamples for standard errors (0: none, fast).
        random_seed: seed of lm-eval's samplers.

    Returns:
        Dict[str, Any]: ``{"results": {task: {metric: value}}, "versions": ..., ...}`` as
        lm-eval returns it, samples left out.
    """
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("lm_eval.tasks is empty; name at least one task.")
    manager = TaskManager(
        include_path=include_path, include_defaults=include_defaults, metadata=metadata
    )
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        where = f" or in include_path={include_path!r}" if include_path else ""
        raise ValueError(
            f"lm_eval.tasks {missing} are not lm-eval tasks{where}; list the known ones with "
            "`lm_eval --tasks list`, or point lm_eval.include_path at your task YAML files."
        )
    results = simple_evaluate(
        model=wrapper,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        random_seed=random_seed,
        numpy_random_seed=random_seed,
        torch_random_seed=random_seed,
        fewshot_random_seed=random_seed,
        metadata=metadata,
    )
    return results or {}
