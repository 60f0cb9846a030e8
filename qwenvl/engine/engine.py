"""LLM: the offline engine. Prompts in, RequestOutputs out; add_request / step / abort underneath.

One step = schedule (scheduler.py) -> forward over the paged cache (runner.py) -> sample (sampling.py) ->
append tokens, detokenize, check stops (outputs.py). The sampled ids are the only per-step device->host copy.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import env_flag
from ..errors import InputError
from ..layers import host_copy_async
from ..preprocess import VisionInput
from ..rope import positions_from_blocks, video_time_factors
from . import spmd
from .kv_cache import BlockManager
from .outputs import CompletionOutput, RequestOutput, StepOutput, TextStream
from .runner import ModelRunner
from .sampling import SamplerRow, SamplingParams, sample
from .scheduler import Scheduler
from .sequence import PromptData, Sequence, Status, VisionItem, content_hash

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class _Request:
    request_id: str
    prompt: PromptData
    params: SamplingParams
    seqs: list[Sequence]
    streams: list[TextStream]

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(s.index, st.text, s.output_token_ids, s.finish_reason,
                                 list(s.logprobs) if s.params.logprobs is not None else None)
                for s, st in zip(self.seqs, self.streams)]
        return RequestOutput(self.request_id, list(self.prompt.token_ids), outs,
                             finished=all(s.is_finished for s in self.seqs),
                             num_cached_tokens=self.seqs[0].num_cached_tokens)


class LLM:
    """Offline engine over a Qwen25VL: continuous batching, chunked prefill, paged KV cache, prefix caching.

    model: a checkpoint directory or a built Qwen25VL. processor: a Processor (for chat messages and text);
    by default the checkpoint's, or the built-in tokenizer. num_blocks / kv_cache_bytes size the KV cache
    explicitly (the CPU default is 1 GiB); on CUDA it is sized by gpu_memory_utilization by default.
    batch_invariant (default: QWENVL_BATCH_INVARIANT=1 in the environment, else off): every request's outputs the
    same bits whatever it is batched with, however its prompt is chunked, with or without CUDA graphs
    (engine/batch_invariant.py; CUDA, bf16/fp16, one GPU, no FP8; slower: docs/BENCHMARKS.md).
    """

    def __init__(self, model, dtype: torch.dtype | None = None, device=None, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 block_size: int = 16, num_blocks: int | None = None, enable_prefix_caching: bool = True,
                 enable_cuda_graphs: bool = True, processor=None, kv_cache_bytes: int | None = None,
                 encoder_cache_tokens: int = 32768, seed: int = 0, tensor_parallel_size: int = 1,
                 quantization: str | None = None, batch_invariant: bool | None = None):
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "model", "processor", "__class__")}
        for name, val in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                          ("block_size", block_size)):
            if not isinstance(val, int) or val < 1:
                raise InputError(f"LLM: {name}={val!r} must be a positive integer")
        if not 0 < gpu_memory_utilization <= 1:
            raise InputError(f"LLM: gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
        spmd.check_options(tensor_parallel_size, quantization)
        if batch_invariant is None:
            batch_invariant = env_flag("QWENVL_BATCH_INVARIANT", False)
        if batch_invariant and (tensor_parallel_size > 1 or quantization):
            raise InputError("LLM: batch_invariant runs one GPU's bf16/fp16 kernels: not with tensor_parallel_size="
                             f"{tensor_parallel_size} or quantization={quantization!r}")
        # tensor parallelism: this process is one rank of an SPMD group (spmd.py); rank 0 drives the others
        self._tp: spmd.TPChannel | None = None
        # new frames are copied to pinned memory by the hashing threads (VisionInput.content_hash(stage=True)), so
        # the upload needs no serial pinning copy (QWENVL_STAGE_FRAMES=0: off). H100, 2026-12-06, one process, runs
        # alternated: W4 5,040 / 5,091 tok/s with it against 4,915 / 4,875 without, W2 45.9 / 45.7 ms against
        # 46.7 / 48.4 (docs/BENCHMARKS.md)
        self._stage_frames = env_flag("QWENVL_STAGE_FRAMES", True)
        self._tp_workers = None
        self._tp_results: list[tuple] = []  # rank 0: this step's tokens, for the next control message
        self._tp_adds: list[tuple] = []  # rank 0: requests added since the last control message
        self._shut = False
        rank = 0
        if tensor_parallel_size > 1:
            rank, device, self._tp_workers = spmd.setup(model, device, tensor_parallel_size, init_kwargs)
        try:
            model, path = spmd.build_model(model, dtype, device, rank, tensor_parallel_size, quantization)
            if tensor_parallel_size > 1:
                self._tp = spmd.TPChannel(model.device)
        except BaseException:
            self._stop_workers()
            raise
        self.model = model.eval()
        self.device = model.device
        self.config = model.config
        self.processor = processor if processor is not None else _default_processor(path)
        self.tokenizer = self.processor.tokenizer if self.processor is not None else None
        self.eos_token_ids = _eos_token_ids(path, self.config, self.tokenizer)

        self.runner = ModelRunner(model, block_size=block_size, max_num_seqs=max_num_seqs,
                                  enable_cuda_graphs=enable_cuda_graphs, encoder_cache_tokens=encoder_cache_tokens,
                                  batch_invariant=batch_invariant)
        if num_blocks is None:
            if kv_cache_bytes is None and self.device.type == "cuda":
                num_blocks = self.runner.profile_num_blocks(gpu_memory_utilization, max_num_batched_tokens)
            else:
                num_blocks = (kv_cache_bytes or DEFAULT_CPU_KV_CACHE_BYTES) // self.runner.kv_bytes_per_block()
        if self._tp is not None:  # block ids must mean the same memory on every rank
            self.runner.tp = self._tp
            num_blocks = self._tp.min_int(num_blocks)
        if num_blocks < 1:
            raise InputError("LLM: no room for the KV cache (raise gpu_memory_utilization or kv_cache_bytes)")
        capacity = num_blocks * block_size
        limit = self.config.text.max_position_embeddings
        if max_model_len is None:
            max_model_len = min(limit, capacity)
        elif max_model_len > capacity:
            raise InputError(f"LLM: max_model_len={max_model_len} needs more KV cache than the {num_blocks} blocks "
                             f"({capacity} tokens) available; lower it or give the cache more memory")
        self.max_model_len = max_model_len
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner.capture_cuda_graphs(max_model_len)
        self._requests: dict[str, _Request] = {}
        self._pending_aborts: list[str] = []
        self._arrival = itertools.count()
        self._request_counter = itertools.count()
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        # decode steps launched one step ahead (runner.decode_ahead): CUDA graphs only; QWENVL_DECODE_AHEAD=0 off
        self.decode_ahead = bool(self.runner.graphs) and env_flag("QWENVL_DECODE_AHEAD", True)
        self._ahead = None
        self.num_ahead_steps = 0
        if self._tp_workers is not None:
            spmd.register_shutdown(self)

    # ------------------------------------------------------------------------------------------ stats
    @property
    def num_used_blocks(self) -> int:
        return self.block_manager.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def stats(self) -> dict[str, Any]:
        return {"num_used_blocks": self.num_used_blocks, "num_free_blocks": self.num_free_blocks,
                "num_blocks": self.block_manager.num_blocks, "block_size": self.block_manager.block_size,
                "num_waiting": len(self.scheduler.waiting), "num_running": len(self.scheduler.running),
                "num_preemptions": self.scheduler.num_preemptions,
                "prefix_cache_hit_tokens": self.block_manager.prefix_hits,
                "encoder_runs": self.runner.num_encoder_runs, "encoded_items": self.runner.num_encoded_items,
                "cuda_graph_batch_sizes": sorted(self.runner.graphs), "triton_decode": self.runner.use_triton,
                "decode_merge_max_splits": self.runner.decode_merge_max_splits,
                "compiled_ops": self.runner.ops.compiled, "bf16_gemv": self.runner.bf16_gemv,
                "fused_gemv_layers": (plan := self.runner._gemv_plan(1)) is not None, "fused_rope_kv": self.runner.fused_rope_kv,
                "fp32_logits": self.runner.fp32_logits,
                "gemv_rope": bool(plan) and all(ops[4] for ops in plan),
                "gemv_silu_out": bool(plan) and all(ops[5] for ops in plan),
                "triton_silu": self.runner.triton_silu, "gqa_prefill": self.runner.gqa_prefill,
                "decode_ahead": self.decode_ahead, "decode_ahead_steps": self.num_ahead_steps,
                "vision_graph_replays": vg.replays if (vg := self.runner.vision_graphs) is not None else 0,
                "batch_invariant": self.runner.batch_invariant, "max_model_len": self.max_model_len}

    # ------------------------------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt) -> PromptData:
        """A prompt in any accepted form -> token ids, vision items, MRoPE positions (done once per request).

        Accepted: chat messages (list of {"role", "content"} dicts); a text string (no chat template);
        token ids (list of ints or a 1-D tensor); or a dict with "prompt_token_ids" (or "input_ids") and
        optional "images" [(pixel_values, grid_thw)] and "videos" [(pixel_values, grid_thw, second_per_grid)]
        or, as Processor.encode_conversation gives them, preprocess.VisionInput items (uint8 frames, normalised
        and patchified on the engine's device); or {"messages": [...]}, or {"prompt": "..."}.
        """
        images, videos = [], []
        if isinstance(prompt, dict) and "messages" in prompt:
            prompt = prompt["messages"]
        if isinstance(prompt, dict) and "prompt" in prompt:
            prompt = prompt["prompt"]
        if _is_messages(prompt):
            self._need_processor("chat messages")
            enc = self.processor.encode_conversation(prompt)
            ids, images, videos = enc["input_ids"], enc["images"], enc["videos"]
        elif isinstance(prompt, str):
            self._need_processor("a text prompt")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids", prompt.get("input_ids"))
            if ids is None:
                raise InputError(f"prompt dict needs 'prompt_token_ids' (or 'messages' / 'prompt'); got keys "
                                 f"{sorted(prompt)}")
            images, videos = list(prompt.get("images") or []), list(prompt.get("videos") or [])
        else:
            ids = prompt
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            ids = ids.tolist()
        # set(map(type)) and min/max run in C: a per-id Python check was ~1.5 ms of a 1.3k-token image prompt
        if not isinstance(ids, (list, tuple)) or (ids and set(map(type, ids)) != {int}):
            raise InputError(f"prompt must be messages, a string, token ids or a prompt dict; got {type(prompt).__name__}")
        ids = list(ids)
        vocab = self.config.text.vocab_size
        if not ids:
            raise InputError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InputError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InputError(f"the prompt is {len(ids)} tokens long; max_model_len is {self.max_model_len}, "
                             f"so a prompt may have at most {self.max_model_len - 1} tokens")
        return self._prompt_data(ids, images, videos)

    def _prompt_data(self, ids: list[int], images, videos) -> PromptData:
        c = self.config
        m = c.vision.spatial_merge_size
        queues = {c.image_token_id: [_vision_entry("image", x) for x in images],
                  c.video_token_id: [_vision_entry("video", x) for x in videos]}
        items: list[VisionItem] = []
        # (start, t, merged h, merged w, time factors) of each block: rope.positions_from_blocks' input, so the
        # MRoPE positions need no second scan of the prompt (rope.mrope_positions': ~0.3 ms of a 1.3 k-token prompt)
        blocks: list[tuple] = []
        used = {c.image_token_id: 0, c.video_token_id: 0}
        # a pinned upload copy made while hashing (not under tensor parallelism: the prompt travels to the ranks)
        stage = self.runner.is_cuda and self._tp is None and self._stage_frames
        i = 0
        while i < len(ids):
            tok = ids[i]
            if tok not in queues:
                i += 1
                continue
            kind = "image" if tok == c.image_token_id else "video"
            if used[tok] >= len(queues[tok]):
                raise InputError(f"the prompt has more {kind} blocks than {kind}s given ({len(queues[tok])})")
            pix, vin, grid, spg = queues[tok][used[tok]]
            used[tok] += 1
            grid = tuple(int(x) for x in (grid.tolist() if isinstance(grid, torch.Tensor) else grid))
            n = grid[0] * grid[1] * grid[2] // (m * m)
            if ids[i:i + n] != [tok] * n:
                raise InputError(f"{kind} {used[tok] - 1} with grid {grid} needs {n} consecutive pad tokens at "
                                 f"prompt position {i}")
            # the model's positions treat pads not right after <|vision_start|> as text: such a block is refused
            # (before its image is hashed) rather than fed to the ViT at text positions
            if i == 0 or ids[i - 1] != c.vision_start_token_id:
                raise InputError(f"the {kind} block at prompt position {i} must follow the vision start token "
                                 f"{c.vision_start_token_id}")
            factors = (video_time_factors(float(spg), c.vision.tokens_per_second, c.mrope_temporal)
                       if kind == "video" else (0.0, 0.0))
            blocks.append((i, grid[0], grid[1] // m, grid[2] // m, *factors))
            key = vin.content_hash(stage=stage) if vin is not None else content_hash(pix, grid, spg)
            items.append(VisionItem(kind, pix, grid, spg, i, n, key, vin.frames if vin is not None else None,
                                    vin.take_staged() if vin is not None else None))
            i += n
        for tok, q in queues.items():
            if used[tok] != len(q):
                kind = "image" if tok == c.image_token_id else "video"
                raise InputError(f"{len(q)} {kind}s given but the prompt has {used[tok]} {kind} blocks")
        if not items:
            return PromptData(ids)
        pos, top = positions_from_blocks(len(ids), blocks)
        return PromptData(ids, items, pos, top + 1 - len(ids))

    def _encode_all(self, prompts: list) -> list[PromptData]:
        """encode_prompt of each prompt, in order, on up to ENCODE_THREADS threads: the content hash of each image
        (SHA-256 of its frames), the processor's image work and the MRoPE positions run in parallel (W4's 256
        image prompts: 1.75 -> 1.12 ms each with 2 threads on the 2-core dev box). The first failing prompt's
        error is raised, as serially."""
        workers = min(ENCODE_THREADS, os.cpu_count() or 1, len(prompts))
        if workers < 2:
            return [self.encode_prompt(p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="qwenvl-encode") as pool:
            return list(pool.map(self.encode_prompt, prompts))

    def _need_processor(self, what: str) -> None:
        if self.processor is None:
            raise InputError(f"{what} needs a processor/tokenizer; pass processor= to LLM")

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> None:
        self._add_encoded(request_id, self.encode_prompt(prompt), params)

    def _add_encoded(self, request_id: str, prompt: PromptData, params: SamplingParams | None) -> None:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        request_id = str(request_id)
        if request_id in self._requests:
            raise InputError(f"request id {request_id!r} is already in use")
        seqs, streams = [], []
        for i in range(params.n):
            p = params.child(i) if params.n > 1 else params
            gen = torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
            seqs.append(Sequence(request_id, i, next(self._arrival), prompt, p, gen))
            streams.append(TextStream(self.tokenizer, p))
        self._requests[request_id] = _Request(request_id, prompt, params, seqs, streams)
        for s in seqs:
            self.scheduler.add(s)
        if self._tp is not None and self._tp.rank == 0:  # the other ranks add it at the next step
            self._tp_adds.append((request_id, prompt, dataclasses.replace(params, logits_processors=None)))

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at the next step boundary (step() reports it finished)."""
        if str(request_id) in self._requests:
            self._pending_aborts.append(str(request_id))

    def has_unfinished(self) -> bool:
        return bool(self._pending_aborts) or self.scheduler.has_unfinished()

    # ------------------------------------------------------------------------------------------ a step
    def step(self) -> list[StepOutput]:
        if self._tp is not None:
            self._tp_send("step")
        outputs = self._process_aborts()
        chunks = self.scheduler.schedule()
        ahead, self._ahead = self._ahead, None
        if not chunks:
            return outputs
        logits = self.runner.take_ahead(ahead, chunks) if ahead is not None else None
        if logits is None:
            logits = self.runner.execute(chunks)
        else:
            self.num_ahead_steps += 1
        self.scheduler.after_step(chunks)
        sampling = [c.seq for c in chunks if c.samples]
        if any(s.params.logits_processors for s in sampling):
            with torch.inference_mode():  # the logits are inference tensors
                for row, seq in enumerate(sampling):
                    for proc in seq.params.logits_processors:
                        logits[row] = proc(seq.output_token_ids, logits[row])
        rows = [SamplerRow(s.params, s.prompt.token_ids if s.params.repetition_penalty != 1 else [],
                           s.output_token_ids if _penalised(s.params) else [], s.generator) for s in sampling]
        result = sample(logits, rows, self._generator)
        token_ids = host_copy_async(result.token_ids)  # before a step is launched ahead: not ordered after it
        sched = self.scheduler
        if (self.decode_ahead and self._tp is None and all(c.is_decode and c.samples for c in chunks)
                and not all(_last_by_length(c.seq) for c in chunks)
                and not (sched.waiting and len(sched.running) < sched.max_num_seqs)  # the next step admits one
                and all(c.end < self.max_model_len and self.block_manager.allocate(c.seq, c.end + 1) for c in chunks)):
            # the next decode step goes to the GPU now, fed by this step's tokens on the device (its blocks
            # allocated now rather than by the next schedule(); a sequence that stops frees them as usual)
            self._ahead = self.runner.decode_ahead(chunks, result.token_ids)
        for seq, tok, lp in zip(sampling, token_ids().tolist(), result.logprobs):
            out = self._append_token(seq, tok, lp)
            outputs.append(out)
            if self._tp is not None:
                self._tp_results.append((seq.request_id, seq.index, tok, out.finish_reason))
        return outputs

    # ------------------------------------------------------------------------------------------ tensor parallel
    def _tp_send(self, kind: str) -> None:
        """rank 0: the control message that the other ranks' follow() applies (spmd.py)."""
        if self._tp.rank != 0:
            raise RuntimeError("under tensor parallelism only rank 0 drives the engine; the other ranks call "
                               "follow() (or generate/chat with the same arguments)")
        if self._shut:
            raise RuntimeError("the tensor-parallel engine is shut down")
        msg = (kind, self._tp_results, self._tp_adds, list(self._pending_aborts))
        self._tp_results, self._tp_adds = [], []
        self._tp.broadcast(msg)

    def follow(self, until: str = "shutdown") -> None:
        """Ranks > 0: mirror rank 0's engine, step by step, until rank 0 sends `until` ("return": the end
        of one generate/chat call) or shutdown. Their forward passes are the shard's part of every step."""
        if self._tp is None or self._tp.rank == 0:
            raise RuntimeError("follow() is for ranks > 0 of a tensor-parallel engine")
        while True:
            kind, results, adds, aborts = self._tp.broadcast()
            for rid, index, tok, reason in results:
                req = self._requests[rid]
                seq = req.seqs[index]
                seq.token_ids.append(tok)
                if reason is not None:
                    self.scheduler.finish(seq, reason)
                    if all(s.is_finished for s in req.seqs):
                        del self._requests[rid]
            for rid, prompt, params in adds:
                self._add_encoded(rid, prompt, params)
            self._pending_aborts.extend(aborts)
            if kind == "step":
                self._process_aborts()
                chunks = self.scheduler.schedule()
                if chunks:
                    self.runner.execute(chunks)  # no sampling here: rank 0 sends its tokens
                    self.scheduler.after_step(chunks)
            elif kind == "shutdown":
                self._tp.barrier()  # rank 0 leaves the process group only after every rank has the message
                self._shut = True
                return
            elif kind == until:
                return

    def shutdown(self) -> None:
        """Tensor parallelism: rank 0 stops the other ranks (their follow() returns) and, in the one-process
        mode, joins their processes and leaves the process group. A no-op otherwise, and when repeated."""
        if self._tp is None or self._shut:
            return
        if self._tp.rank == 0:
            self._tp_send("shutdown")
            self._tp.barrier()
        self._shut = True
        self._stop_workers()

    def _stop_workers(self) -> None:
        """One-process mode: leave the process group this LLM created, then reap the worker ranks."""
        if self._tp_workers is None:
            return
        workers, self._tp_workers = self._tp_workers, None
        from ..parallel.launch import leave_process_group

        self.runner.graphs, self.runner.graph_sizes = {}, []  # captured NCCL calls must not outlive their group
        if not leave_process_group():
            log.warning("tensor-parallel shutdown: the process group did not close within 10 s; going on")
        workers.join(timeout=30)  # then terminated: shutdown is bounded
        for failure in workers.failures():
            log.error("tensor-parallel worker: %s", failure)

    def _append_token(self, seq: Sequence, tok: int, logprobs) -> StepOutput:
        req = self._requests[seq.request_id]
        stream = req.streams[seq.index]
        p = seq.params
        seq.token_ids.append(tok)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        reason = None
        if (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids:
            reason = "stop"  # the stop token stays in token_ids, not in the text
        elif stream.push(tok):
            reason = "stop"
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            reason = "length"
        elif seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            stream.close()
        out = StepOutput(seq.request_id, [tok], stream.take_delta(reason is not None), reason is not None,
                         seq.index, reason, [logprobs] if logprobs is not None else None)
        return self._maybe_complete(req, out)

    def _maybe_complete(self, req: _Request, out: StepOutput) -> StepOutput:
        if all(s.is_finished for s in req.seqs):
            out.output = req.output()
            del self._requests[req.request_id]
        return out

    def _process_aborts(self) -> list[StepOutput]:
        outputs = []
        for rid in self._pending_aborts:
            req = self._requests.get(rid)
            if req is None:  # finished meanwhile
                continue
            for seq, stream in zip(req.seqs, req.streams):
                if seq.status != Status.FINISHED:
                    self.scheduler.finish(seq, "abort")
                    stream.close()
                    outputs.append(self._maybe_complete(
                        req, StepOutput(rid, [], stream.take_delta(True), True, seq.index, "abort")))
        self._pending_aborts.clear()
        return outputs

    # ------------------------------------------------------------------------------------------ offline API
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Prompts (one or a list; see encode_prompt for the forms) -> one RequestOutput each, in order."""
        if not isinstance(prompts, list) or (prompts and isinstance(prompts[0], int)) or _is_messages(prompts):
            prompts = [prompts]
        return self._run_all(prompts, params)

    def chat(self, conversations, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of them -> one RequestOutput each, in order."""
        if _is_messages(conversations):
            conversations = [conversations]
        if not isinstance(conversations, list) or not all(_is_messages(c) for c in conversations):
            raise InputError("chat() takes a conversation (list of {'role', 'content'} messages) or a list of them")
        return self._run_all(conversations, params)

    def _run_all(self, prompts: list, params) -> list[RequestOutput]:
        if self._tp is not None and self._tp.rank != 0:  # torchrun: rank 0's call drives this one
            self.follow(until="return")
            return []
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise InputError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        else:
            params = [params] * len(prompts)
        encoded = self._encode_all(prompts)  # all validated before any is queued
        ids = [f"offline-{next(self._request_counter)}" for _ in prompts]
        for rid, enc, p in zip(ids, encoded, params):
            self._add_encoded(rid, enc, p)
        results: dict[str, RequestOutput] = {}
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.output is not None and out.request_id in pending:
                    results[out.request_id] = out.output
                    pending.discard(out.request_id)
        if self._tp is not None and self._tp_workers is None:  # torchrun: the other ranks' calls return
            self._tp_send("return")
        return [results[r] for r in ids]


ENCODE_THREADS = 8  # encode_prompt's hashing, image work and torch ops release the GIL


def _last_by_length(seq: Sequence) -> bool:
    """The token about to be appended is seq's last by max_tokens."""
    return seq.params.max_tokens is not None and seq.num_output_tokens + 1 >= seq.params.max_tokens


def _vision_entry(kind: str, x) -> tuple:
    """An "images" / "videos" entry -> (pixel_values or None, VisionInput or None, grid, second_per_grid)."""
    if isinstance(x, VisionInput):
        if x.kind != kind:
            raise InputError(f"a {x.kind} VisionInput was given among the {kind}s")
        return None, x, x.grid_thw, x.second_per_grid
    try:
        if kind == "image":
            pix, grid = x
            return pix, None, grid, 0.0
        pix, grid, spg = x
        return pix, None, grid, float(spg)
    except (TypeError, ValueError):
        form = "(pixel_values, grid_thw)" if kind == "image" else "(pixel_values, grid_thw, second_per_grid)"
        raise InputError(f"each of the prompt's {kind}s must be {form} or a VisionInput, got "
                         f"{type(x).__name__}") from None


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], dict) and "role" in x[0]


def _default_processor(path):
    try:
        from ..processor import Processor

        return Processor.from_pretrained(path)
    except Exception as e:  # no tokenizer at hand: token-id prompts still work
        log.warning("no processor (%s); only token-id prompts will work and outputs have no text", e)
        return None


def _eos_token_ids(path, config, tokenizer=None) -> set[int]:
    """The config's eos id, generation_config.json's when the checkpoint has one (Qwen2.5-VL: <|im_end|>,
    <|endoftext|>), and the tokenizer's ids of those two tokens (its own numbering: a pruned vocabulary differs)."""
    ids = {config.eos_token_id}
    if tokenizer is not None:
        ids |= {i for i in (tokenizer.eos_token_id, tokenizer.im_end_id, tokenizer.endoftext_id) if i is not None}
    if path is not None:
        f = os.path.join(path, "generation_config.json")
        if os.path.exists(f):
            try:
                with open(f, encoding="utf-8") as fh:
                    eos = json.load(fh).get("eos_token_id")
                ids |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
            except (OSError, ValueError):
                pass
    return ids
