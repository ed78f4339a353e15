"""``draftcache eval --engine vllm``: the exported draft served by a real vLLM, next to our own eval.

vLLM is imported lazily, here only: nothing else in draftcache needs it. On the same prompts (see
:func:`~draftcache.trainer.evaluate.load_eval_prompts`) this runs

1. our eval (:func:`~draftcache.trainer.evaluate.evaluate_draft`: HF target, chain speculative
   decoding, counters kept as vLLM keeps them);
2. vLLM plain greedy (``temperature=0``) with the target alone;
3. vLLM with ``speculative_config={"method": "eagle3", "model": draft_dir, "num_speculative_tokens": K}``
   (plus ``"parallel_drafting": True`` for a P-EAGLE export),
   after checking what vLLM loaded (:func:`check_vllm_draft`), and reads vLLM's own counters from
   ``llm.get_metrics()`` (drafts, draft tokens, accepted tokens, accepted per position).

The load check exists because ``Eagle3LlamaForCausalLM.load_weights`` returns None, which turns
off vLLM's check for parameters the checkpoint left uninitialised: a missing tensor would be
served as its random (or ones) initial value without a word. So every drafter parameter vLLM
holds is compared with the export file itself, after vLLM's own renaming (``d2t`` ->
``draft_id_to_target_id``, ``model.`` prefix except ``lm_head``, ``midlayer.`` -> ``layers.0.``,
q/k/v stacked into ``qkv_proj`` and gate/up into ``gate_up_proj``, ``t2d`` skipped by design), and
the check fails on any difference, any export tensor that lands nowhere, any parameter nothing
filled (``embed_tokens`` may come from the target: vLLM shares the target's table when the export
has none; ``layers.{i >= 1}.hidden_norm``, which vLLM builds in every layer but only layer 0 reads,
is left out), any weight-related warning vLLM logs while loading, any variant setting
(``norm_before_fc``, ``fc_norm``, ``norm_output``, ``norm_before_residual``, ``attention_bias``,
``num_hidden_layers``, ``parallel_drafting`` and its ``mask_token_id``) read otherwise than our draft
computes (P-EAGLE's ``mask_hidden`` is a buffer in vLLM; it is snapshotted and compared too), and
any difference between the target layers vLLM feeds the drafter (the
``eagle_aux_hidden_state_layer_ids`` it resolved, read from the target model in the worker) and the
layers the draft was trained on (the cache's aux ids the export records, plus one: vLLM's id ``i``
is the input of decoder layer ``i``, ours the output of layer ``i``). A wrong mapping stays lossless
and only lowers acceptance, so no other check would catch it.

The verdict (``VLLMEvalReport.ok``) needs every check: the load check, vLLM speculative output equal
to vLLM plain greedy and to our eval's output, our eval lossless, and vLLM's acceptance counters
equal to ours.

A DSpark export cannot be served by the CPU build (it refuses ``method: "dspark"``);
:func:`check_vllm_dspark_draft` runs the same load check on vLLM's own ``Qwen3DSparkForCausalLM``
built on CPU without an engine (the comparison core, :func:`compare_params_with_tensors`, is shared).

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that the check reads the
drafter's parameters directly; fp32 and ``enforce_eager`` (the CPU build's settings; outputs must
then equal plain greedy token for token).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from draftcache.trainer.evaluate import EvalPrompts, EvalReport, evaluate_draft, load_eval_prompts
from draftcache.trainer.eagle3.export import CONFIG_FILE, WEIGHTS_FILE, is_peagle_export, read_export_config
from draftcache.trainer.speculative import SpecDecodeStats

__all__ = ["VLLMEngine", "VLLMLoadCheck", "VLLMEvalReport", "check_vllm_draft", "check_vllm_dspark_draft",
           "compare_params_with_tensors", "compare_with_export",
           "counters_since", "drafter_state", "evaluate_with_vllm", "make_vllm", "release_vllm", "served_aux_layers", "VLLM_RESERVED_ARGS",
           "trained_aux_layer_ids", "vllm_generate", "vllm_spec_counters"]

# vLLM builds hidden_norm in every decoder layer, but only layer 0 reads it (later layers take H)
_UNUSED_BY_VLLM = re.compile(r"model\.layers\.[1-9][0-9]*\.hidden_norm\.weight")
# vLLM's Eagle3 q/k/v and gate/up stacking (LlamaModel.hf_to_vllm_mapper), in row order
_STACKED = {".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
            ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}
_SPEC_METRICS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_per_pos")


# --------------------------------------------------------------------------------------------
# The load check
# --------------------------------------------------------------------------------------------


@dataclass
class VLLMLoadCheck:
    """What vLLM's drafter holds, compared with the export. ``ok`` only when nothing is off."""

    compared: list[str] = field(default_factory=list)   # vLLM parameters equal to the export's tensors
    shared: list[str] = field(default_factory=list)     # vLLM parameters that are the target's (not exported)
    problems: list[str] = field(default_factory=list)   # differences, missing or skipped names, flags
    warnings: list[str] = field(default_factory=list)   # weight-related warnings vLLM logged while loading
    flags: dict[str, Any] = field(default_factory=dict)  # EAGLE-3 variant flags as vLLM read them
    aux_layers: tuple[int, ...] | None = None            # target layers vLLM feeds the drafter (its ids)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.warnings

    def format(self) -> str:
        head = (f"{'ok' if self.ok else 'FAILED'}: {len(self.compared)} drafter parameters equal the export"
                + (f", {', '.join(self.shared)} shared from the target" if self.shared else ""))
        lines = [head] + [f"  problem: {p}" for p in self.problems] + [f"  vLLM warned: {w}" for w in self.warnings]
        return "\n".join(lines)


def _vllm_name(name: str) -> tuple[str, int | None] | None:
    """Where vLLM's ``Eagle3LlamaForCausalLM.load_weights`` puts export tensor ``name``:
    ``(parameter, row block of a stacked parameter or None)``, or None when it skips it (``t2d``)."""
    if "t2d" in name:
        return None
    if "mask_hidden" in name:
        return "mask_hidden", None  # copied into the buffer of that name, no prefix
    if "d2t" in name:
        name = name.replace("d2t", "draft_id_to_target_id")
    elif "lm_head" not in name:
        name = "model." + name
    name = name.replace("midlayer.", "layers.0.")
    for old, (new, block) in _STACKED.items():
        if old in name:
            return name.replace(old, new), block
    return name, None


def compare_params_with_tensors(check: VLLMLoadCheck, params: dict[str, torch.Tensor],
                                tensors: dict[str, torch.Tensor], *, shared: set[str] = frozenset(),
                                unused: re.Pattern = _UNUSED_BY_VLLM) -> VLLMLoadCheck:
    """The load check every family shares: each export tensor (``tensors``) where vLLM's drafter
    ``load_weights`` puts it (``model.`` prefix except ``lm_head``, ``d2t`` renamed, ``t2d`` skipped,
    q/k/v and gate/up stacked) must equal that parameter of ``params``, and every parameter must be
    filled, except ``shared`` ones (taken from the target) and those matching ``unused``.
    Differences go to ``check.problems``, equal parameters to ``check.compared``."""
    # stacked parameters are filled block by block: collect the blocks, then compare once
    blocks: dict[str, dict[int, torch.Tensor]] = {}
    filled: set[str] = set()
    for name, tensor in sorted(tensors.items()):
        where = _vllm_name(name)
        if where is None:
            continue  # t2d: vLLM rebuilds nothing from it (it maps with d2t), by design
        pname, block = where
        if pname not in params:
            check.problems.append(f"export tensor {name} maps to {pname}, which vLLM's drafter does not have")
            continue
        if block is not None:
            blocks.setdefault(pname, {})[block] = tensor
            continue
        filled.add(pname)
        _same(check, pname, params[pname], tensor, name)
    for pname, parts in sorted(blocks.items()):
        n = 3 if ".qkv_proj." in pname else 2
        if sorted(parts) != list(range(n)):
            check.problems.append(f"{pname}: the export holds blocks {sorted(parts)} of {n}")
            continue
        filled.add(pname)
        _same(check, pname, params[pname], torch.cat([parts[i] for i in range(n)]), f"{pname} (stacked)")
    for pname in sorted(set(params) - filled):
        if pname in shared:
            check.shared.append(pname)
        elif unused.fullmatch(pname):
            continue
        else:
            check.problems.append(f"{pname}: vLLM holds it but the export does not fill it (left at its initial value)")
    return check


def compare_with_export(params: dict[str, torch.Tensor], embed_shared: bool, flags: dict[str, bool],
                        export_dir: Path, aux_layers: tuple[int, ...] | None = None) -> VLLMLoadCheck:
    """``params``: the drafter's parameters as its ``load_weights`` left them; ``embed_shared``:
    whether vLLM then replaced its ``embed_tokens`` by the target's; ``flags``: as vLLM read them;
    ``aux_layers``: the target layers vLLM feeds the drafter (:func:`served_aux_layers`), checked
    against the export's trained ids when given."""
    check = VLLMLoadCheck(flags=dict(flags), aux_layers=None if aux_layers is None else tuple(aux_layers))
    shared = {"model.embed_tokens.weight"} if embed_shared else set()
    compare_params_with_tensors(check, params, load_file(str(export_dir / WEIGHTS_FILE)), shared=shared)
    for flag, want in _expected_flags(export_dir).items():
        if flags.get(flag) != want:
            check.problems.append(f"vLLM reads {flag}={flags.get(flag)}, our draft computes {flag}={want}")
    if aux_layers is not None:
        trained = trained_aux_layer_ids(export_dir)
        want = tuple(sorted(i + 1 for i in trained))
        if tuple(aux_layers) != want:
            check.problems.append(
                f"vLLM feeds the drafter target layers {list(aux_layers)} (its ids: the input of layer i), but the "
                f"draft was trained on the outputs of decoder layers {trained}, vLLM ids {list(want)}: the export's "
                "eagle_aux_hidden_state_layer_ids is off (a wrong mapping stays lossless, only acceptance drops)")
    return check


def trained_aux_layer_ids(export_dir: Path) -> list[int]:
    """The decoder layers (ours: layer ``i``'s output) the exported draft was trained on: what the
    export records (``draftcache.aux_layer_ids``, the cache's ids), else its ``eagle_config``."""
    data = json.loads((export_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    recorded = (data.get("draftcache") or {}).get("aux_layer_ids")
    if recorded is None:
        recorded = (data.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if recorded is None:
        raise ValueError(f"{export_dir / CONFIG_FILE} records no trained aux layer ids (draftcache.aux_layer_ids); "
                         "export the draft with draftcache export")
    return [int(i) for i in recorded]


def _same(check: VLLMLoadCheck, pname: str, param: torch.Tensor, tensor: torch.Tensor, source: str) -> None:
    held = param.detach().cpu()
    if tuple(held.shape) != tuple(tensor.shape):
        check.problems.append(f"{pname}: vLLM holds shape {tuple(held.shape)}, the export's {source} is {tuple(tensor.shape)}")
    elif not torch.equal(held, tensor.to(held.dtype)):
        diff = (held.double() - tensor.double()).abs().max().item()
        check.problems.append(f"{pname}: differs from the export's {source} (max abs difference {diff:.3g})")
    else:
        check.compared.append(pname)


def _expected_flags(export_dir: Path) -> dict[str, Any]:
    """The variant settings our draft computes with, as our loader reads the export's config.json."""
    config = read_export_config(export_dir)
    flags: dict[str, Any] = {
        "norm_before_fc": config.norm_before_fc, "fc_norm": config.fc_norm, "norm_output": config.norm_output,
        "use_aux_hidden_state": True, "norm_before_residual": config.norm_before_residual,
        "attention_bias": config.attention_bias, "num_hidden_layers": config.num_hidden_layers,
        "parallel_drafting": config.parallel_drafting}
    if config.parallel_drafting:
        flags["mask_token_id"] = config.mask_token_id
    return flags


def drafter_state(worker) -> tuple[bool, dict[str, bool]]:
    """Runs in vLLM's worker (``llm.collective_rpc``): whether the drafter's ``embed_tokens`` is the
    target's module, and the EAGLE-3 variant flags its modules were built with."""
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    drafter = runner.drafter.model
    target = runner.get_model() if hasattr(runner, "get_model") else runner.model
    shared = drafter.model.embed_tokens is getattr(getattr(target, "model", None), "embed_tokens", None)
    model = drafter.model
    flags = {
        "norm_before_fc": bool(model.norm_before_fc),
        "fc_norm": model.fc_norm is not None,
        "norm_output": bool(model.norm_output),
        "norm_before_residual": model.layers[0]._residual_norm.__name__ == "_norm_before_residual",
        "use_aux_hidden_state": bool(model.use_aux_hidden_state),
        "attention_bias": model.layers[0].self_attn.qkv_proj.bias is not None,
        "num_hidden_layers": len(model.layers),
        "parallel_drafting": bool(runner.drafter.parallel_drafting),
    }
    if flags["parallel_drafting"]:
        flags["mask_token_id"] = int(runner.drafter.parallel_drafting_token_id)
    return shared, flags


def served_aux_layers(worker) -> tuple[int, ...]:
    """Runs in vLLM's worker (``llm.collective_rpc``): the target layers whose hidden states vLLM
    feeds the drafter, as its model runner resolved them (``eagle_aux_hidden_state_layer_ids`` of
    the draft config, else the model's default) and set on the target's decoder
    (``EagleModelMixin.aux_hidden_state_layers``; vLLM id ``i`` = the input of layer ``i``)."""
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    target = runner.get_model() if hasattr(runner, "get_model") else runner.model
    parent = target.get_language_model() if hasattr(target, "get_language_model") else target
    holder = getattr(parent, "model", parent)  # the same unwrapping as vLLM's set_aux_hidden_state_layers
    return tuple(int(i) for i in holder.aux_hidden_state_layers)


@contextmanager
def _drafter_load_snapshots():
    """Copies of the drafter's parameters right after its ``load_weights`` (in-process engines only):
    the CPU build then repacks linear weights for its GEMM and leaves ``.weight`` empty."""
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    original = Eagle3LlamaForCausalLM.load_weights
    snapshots: list[dict[str, torch.Tensor]] = []

    def load_weights(self, weights):
        result = original(self, weights)
        held = {n: p.detach().cpu().clone() for n, p in self.named_parameters(remove_duplicate=False)}
        if getattr(self, "use_parallel_drafting", False):  # P-EAGLE: a buffer, not a parameter
            held["mask_hidden"] = self.mask_hidden.detach().cpu().clone()
        snapshots.append(held)
        return result

    Eagle3LlamaForCausalLM.load_weights = load_weights
    try:
        yield snapshots
    finally:
        Eagle3LlamaForCausalLM.load_weights = original


class _WeightWarnings(logging.Handler):
    """Collects the warnings vLLM logs about weights (unused, skipped, not initialised)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "weight" in message.lower():
            self.messages.append(message)


@contextmanager
def _capture_weight_warnings():
    handler = _WeightWarnings()
    logger = logging.getLogger("vllm")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def check_vllm_draft(engine: "VLLMEngine", draft_dir: str | os.PathLike[str]) -> VLLMLoadCheck:
    """Compare every drafter parameter ``engine`` (built by :func:`make_vllm` with ``draft_dir``)
    loaded with ``draft_dir``'s export (see the module doc for what fails the check)."""
    if len(engine.drafter_params) != 1:
        raise RuntimeError(f"expected one drafter load, saw {len(engine.drafter_params)}; is the engine in-process "
                           "(VLLM_ENABLE_V1_MULTIPROCESSING=0) and speculative?")
    shared, flags = engine.llm.collective_rpc(drafter_state)[0]
    aux_layers = engine.llm.collective_rpc(served_aux_layers)[0]
    check = compare_with_export(engine.drafter_params[0], shared, flags, Path(draft_dir), aux_layers=aux_layers)
    check.warnings = list(engine.warnings)
    return check


# vLLM's DSpark drafter: mask_embedding is an unused placeholder (DSpark masks via the vocab row)
_UNUSED_BY_VLLM_DSPARK = re.compile(r"model\.mask_embedding")


def check_vllm_dspark_draft(target_model: str, draft_dir: str | os.PathLike[str]) -> VLLMLoadCheck:
    """The load check of a DSpark export without serving it (vLLM's CPU build refuses ``method:
    "dspark"``: its V1 runner does not support it and V2 needs Triton): vLLM's own
    ``Qwen3DSparkForCausalLM`` is built on CPU from the ``SpeculativeConfig`` vLLM derives for
    ``{"method": "dspark", "model": draft_dir, "num_speculative_tokens": block_size}``, its own
    ``load_weights`` is called on the export, and every parameter is compared with the file
    (:func:`compare_params_with_tensors`; ``embed_tokens`` and ``lm_head`` are the target's, which
    vLLM's ``load_dspark_model`` shares when the export has none). Also failed: DSpark settings vLLM
    reads otherwise than our draft computes with (``markov_rank``, ``sample_from_anchor``,
    ``mask_token_id``, the confidence head) and target layers other than the trained ones
    (vLLM's ids are ours plus one)."""
    from vllm.config import SpeculativeConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM
    from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config

    from draftcache.trainer.dflash.config import DFlashDraftConfig

    draft_dir = Path(draft_dir)
    ours = DFlashDraftConfig.from_hf_config(json.loads((draft_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    if not ours.is_dspark:
        raise ValueError(f"{draft_dir} is not a DSpark export (no markov_rank in its config.json)")
    vllm_config = EngineArgs(model=str(target_model), dtype="float32", enforce_eager=True,
                             max_model_len=512).create_engine_config()
    # attached after VllmConfig's validation, which refuses dspark on the CPU build's V1 runner
    vllm_config.speculative_config = SpeculativeConfig(
        method="dspark", model=str(draft_dir), num_speculative_tokens=ours.block_size,
        target_model_config=vllm_config.model_config, target_parallel_config=vllm_config.parallel_config)
    check = VLLMLoadCheck()
    with set_current_vllm_config(vllm_config), _capture_weight_warnings() as warnings, \
            tempfile.TemporaryDirectory() as rendezvous:
        if not model_parallel_is_initialized():  # one CPU process: vLLM's layers ask for their TP rank
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"file://{rendezvous}/init")
            initialize_model_parallel(1, 1)
        drafter = Qwen3DSparkForCausalLM(vllm_config=vllm_config)
        try:
            drafter.load_weights(load_file(str(draft_dir / WEIGHTS_FILE)).items())
        except Exception as error:  # vLLM refuses the file (a name it does not know, a shape): that is the finding
            check.problems.append(f"vLLM's load_weights refused the export: {type(error).__name__}: {error}")
    params = {n: p.detach().cpu().clone() for n, p in drafter.named_parameters()}
    compare_params_with_tensors(check, params, load_file(str(draft_dir / WEIGHTS_FILE)),
                                shared={"model.embed_tokens.weight", "lm_head.weight"}, unused=_UNUSED_BY_VLLM_DSPARK)
    check.warnings = list(warnings)
    hf = vllm_config.speculative_config.draft_model_config.hf_config
    check.flags = {"markov_rank": getattr(hf, "markov_rank", None),
                   "sample_from_anchor": getattr(hf, "sample_from_anchor", True),
                   "mask_token_id": drafter.model.mask_token_id,
                   "confidence_head": drafter.model.confidence_head is not None}
    want = {"markov_rank": ours.markov_rank, "sample_from_anchor": True, "mask_token_id": ours.mask_token_id,
            "confidence_head": ours.enable_confidence_head}
    for flag, value in want.items():
        if check.flags[flag] != value:
            check.problems.append(f"vLLM reads {flag}={check.flags[flag]}, our draft computes {flag}={value}")
    check.aux_layers = tuple(get_eagle3_aux_layers_from_config(vllm_config.speculative_config) or ())
    if check.aux_layers != tuple(i + 1 for i in ours.target_layer_ids):
        check.problems.append(f"vLLM feeds the drafter target layers {list(check.aux_layers)} (its ids), the draft was "
                              f"trained on decoder-layer outputs {ours.target_layer_ids} (vLLM ids plus one)")
    return check


# --------------------------------------------------------------------------------------------
# Engine, generation, counters
# --------------------------------------------------------------------------------------------


@dataclass
class VLLMEngine:
    """An in-process vLLM ``LLM``, the weight warnings it logged while loading and, when
    speculative, the drafter's parameters as its ``load_weights`` left them."""

    llm: Any
    warnings: list[str]
    drafter_params: list[dict[str, torch.Tensor]]


#: ``vllm.LLM`` arguments :func:`make_vllm` sets itself (``--vllm-arg`` may not set them)
VLLM_RESERVED_ARGS = {
    "model": "use --target-model", "speculative_config": "set from --draft and --draft-tokens",
    "dtype": "the comparison runs in fp32", "enforce_eager": "the comparison runs eager",
    "max_model_len": "set from the prompts and --max-new-tokens", "seed": "the comparison is greedy",
    "disable_log_stats": "the acceptance counters need stats", "enable_prefix_caching": "the counters need every forward",
}


def make_vllm(target_model: str, *, draft_dir: str | None = None, draft_tokens: int = 4, max_model_len: int = 2048,
              seed: int = 0, gpu_memory_utilization: float | None = None,
              llm_kwargs: dict[str, Any] | None = None) -> VLLMEngine:
    """A vLLM engine for ``target_model`` (fp32, eager, in-process, stats on, no prefix caching),
    speculative with the EAGLE-3 draft in ``draft_dir`` when given; ``gpu_memory_utilization``
    (default: what is free) and further ``llm_kwargs`` as ``--gpu-memory-utilization`` and
    ``--vllm-arg`` give them (see :mod:`draftcache.targets.vllm_options`)."""
    if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise RuntimeError("the vLLM load check reads the drafter in-process; unset VLLM_ENABLE_V1_MULTIPROCESSING "
                           "or set it to 0")
    from vllm import LLM
    from vllm.platforms import current_platform

    from draftcache.targets.vllm_options import engine_memory_kwargs

    kwargs: dict[str, Any] = dict(model=target_model, dtype="float32", enforce_eager=True, max_model_len=max_model_len,
                                  seed=seed, disable_log_stats=False, enable_prefix_caching=False)
    kwargs.update(engine_memory_kwargs(gpu_memory_utilization, llm_kwargs, on_cpu=current_platform.is_cpu()))
    if draft_dir is not None:
        kwargs["speculative_config"] = {"method": "eagle3", "model": str(draft_dir),
                                        "num_speculative_tokens": draft_tokens}
        if is_peagle_export(draft_dir):
            kwargs["speculative_config"]["parallel_drafting"] = True
    with _capture_weight_warnings() as warnings, _drafter_load_snapshots() as snapshots:
        llm = LLM(**kwargs)
    return VLLMEngine(llm=llm, warnings=warnings, drafter_params=snapshots)


def vllm_generate(llm, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
    """Greedy generations of ``llm`` for token-id prompts, stopping at ``eos_token_id`` (kept) or
    ``max_new_tokens``, as our eval stops."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True,
                            stop_token_ids=[eos_token_id] if eos_token_id is not None else None)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def vllm_spec_counters(llm, draft_tokens: int) -> SpecDecodeStats:
    """vLLM's speculative-decoding counters so far (``llm.get_metrics()``), in our dataclass."""
    values: dict[str, Any] = {}
    for metric in llm.get_metrics():
        if metric.name in _SPEC_METRICS:
            if hasattr(metric, "values"):
                prev = values.get(metric.name) or [0] * len(metric.values)
                values[metric.name] = [a + b for a, b in zip(prev, metric.values)]
            else:
                values[metric.name] = values.get(metric.name, 0) + metric.value
    per_pos = list(values.get("vllm:spec_decode_num_accepted_tokens_per_pos") or [0] * draft_tokens)
    return SpecDecodeStats(draft_tokens=draft_tokens,
                           num_drafts=int(values.get("vllm:spec_decode_num_drafts", 0)),
                           num_draft_tokens=int(values.get("vllm:spec_decode_num_draft_tokens", 0)),
                           num_accepted_tokens=int(values.get("vllm:spec_decode_num_accepted_tokens", 0)),
                           num_accepted_tokens_per_pos=[int(x) for x in per_pos])


def counters_since(after: SpecDecodeStats, before: SpecDecodeStats) -> SpecDecodeStats:
    """The counters of what ran between two :func:`vllm_spec_counters` snapshots."""
    return SpecDecodeStats(
        draft_tokens=after.draft_tokens, num_drafts=after.num_drafts - before.num_drafts,
        num_draft_tokens=after.num_draft_tokens - before.num_draft_tokens,
        num_accepted_tokens=after.num_accepted_tokens - before.num_accepted_tokens,
        num_accepted_tokens_per_pos=[a - b for a, b in zip(after.num_accepted_tokens_per_pos,
                                                           before.num_accepted_tokens_per_pos)])


def release_vllm(engine: VLLMEngine) -> None:
    """Shut an in-process engine down so that the next one starts clean."""
    try:
        engine.llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort; the engine may already be down
        pass
    engine.llm = None
    engine.drafter_params.clear()
    gc.collect()
    try:
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class VLLMEvalReport:
    """Our eval and vLLM's on the same prompts. ``engine`` holds vLLM's counters (its
    ``mean_acceptance_length`` is vLLM's ``1 + accepted / drafts``)."""

    ours: EvalReport
    engine: SpecDecodeStats
    load_check: VLLMLoadCheck
    plain_mismatches: int     # prompts whose vLLM speculative output differs from vLLM plain greedy
    ours_mismatches: int      # prompts whose vLLM speculative output differs from our eval's output

    @property
    def counters_equal(self) -> bool:
        a, b = self.engine, self.ours.stats
        return b is not None and (a.num_drafts, a.num_draft_tokens, a.num_accepted_tokens,
                                  a.num_accepted_tokens_per_pos) == (b.num_drafts, b.num_draft_tokens,
                                                                     b.num_accepted_tokens, b.num_accepted_tokens_per_pos)

    def failures(self) -> list[str]:
        """Every check that failed (empty: the verdict is ok)."""
        failed = []
        if not self.load_check.ok:
            failed.append("load check")
        if self.plain_mismatches:
            failed.append(f"{self.plain_mismatches} vLLM outputs differ from vLLM plain greedy")
        if self.ours_mismatches:
            failed.append(f"{self.ours_mismatches} vLLM outputs differ from ours")
        if self.ours.mismatches:
            failed.append(f"our eval is not lossless ({self.ours.mismatches} mismatches)")
        if not self.counters_equal:
            failed.append("acceptance counters differ")
        return failed

    @property
    def ok(self) -> bool:
        return not self.failures()

    def format(self) -> str:
        e, o = self.engine, self.ours.stats
        n = self.ours.num_prompts
        return "\n".join([
            "draftcache eval:",
            *("  " + line for line in self.ours.format().splitlines()),
            "vLLM:",
            f"  load check         {self.load_check.format()}",
            f"  variant flags      {', '.join(f'{k}={v}' for k, v in self.load_check.flags.items())}",
            f"  target aux layers  {list(self.load_check.aux_layers or [])} (vLLM ids, as it resolved them)",
            f"  engine counters    drafts {e.num_drafts}, draft tokens {e.num_draft_tokens}, accepted "
            f"{e.num_accepted_tokens}, accepted per position {e.num_accepted_tokens_per_pos}",
            f"  mean accept length {e.mean_acceptance_length:.3f} (vLLM) vs {o.mean_acceptance_length:.3f} (ours, same "
            f"counting); counters {'equal' if self.counters_equal else 'DIFFER'}",
            f"  accept rate by pos {' '.join(f'{r:.2f}' for r in e.acceptance_rates)}",
            f"  = plain greedy     {'yes' if self.plain_mismatches == 0 else f'NO: {self.plain_mismatches}/{n} prompts differ'}"
            " (vLLM speculative vs vLLM plain, fp32)",
            f"  = our output       {'yes' if self.ours_mismatches == 0 else f'NO: {self.ours_mismatches}/{n} prompts differ'}",
            f"  verdict            {'ok' if self.ok else 'FAILED: ' + '; '.join(self.failures())}",
        ])


def evaluate_with_vllm(
    *,
    draft_dir: str,
    target_model: str,
    input_data: str | None = None,
    num_prompts: int = 20,
    draft_tokens: int = 4,
    max_new_tokens: int = 64,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    gpu_memory_utilization: float | None = None,
    vllm_args: Sequence[str] = (),
) -> VLLMEvalReport:
    """Our eval, vLLM plain greedy and vLLM with the draft, on the same prompts (see module doc).
    ``gpu_memory_utilization``, ``vllm_args``: ``--gpu-memory-utilization``, ``--vllm-arg``."""
    from draftcache.targets.vllm_options import memory_utilization_problem, parse_vllm_args

    if num_prompts < 1 or draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError("--num-prompts, --draft-tokens and --max-new-tokens must all be >= 1")
    problem = memory_utilization_problem(gpu_memory_utilization)
    if problem:
        raise ValueError(problem)
    llm_kwargs = parse_vllm_args(vllm_args, reserved=VLLM_RESERVED_ARGS)
    engine_options = {"gpu_memory_utilization": gpu_memory_utilization, "llm_kwargs": llm_kwargs}
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (Path(draft_dir) / required).is_file():
            raise FileNotFoundError(f"{Path(draft_dir) / required} not found; --draft needs a directory written by "
                                    "draftcache export")
    prompts: EvalPrompts = load_eval_prompts(target_path=target_model, input_data=input_data, num_prompts=num_prompts,
                                             chat_template=chat_template, trust_remote_code=trust_remote_code)
    ours = evaluate_draft(draft_dir=draft_dir, target_model=target_model, num_prompts=num_prompts,
                          draft_tokens=draft_tokens, max_new_tokens=max_new_tokens, device="cpu",
                          trust_remote_code=trust_remote_code, prompts=prompts)
    eos = prompts.tokenizer.eos_token_id
    max_len = max(len(p) for p in prompts.ids) + max_new_tokens + draft_tokens + 8

    plain_engine = make_vllm(target_model, max_model_len=max_len, **engine_options)
    plain = vllm_generate(plain_engine.llm, prompts.ids, max_new_tokens, eos)
    release_vllm(plain_engine)

    spec_engine = make_vllm(target_model, draft_dir=draft_dir, draft_tokens=draft_tokens, max_model_len=max_len,
                            **engine_options)
    check = check_vllm_draft(spec_engine, draft_dir)
    before = vllm_spec_counters(spec_engine.llm, draft_tokens)
    spec = vllm_generate(spec_engine.llm, prompts.ids, max_new_tokens, eos)
    engine = counters_since(vllm_spec_counters(spec_engine.llm, draft_tokens), before)
    release_vllm(spec_engine)
    return VLLMEvalReport(ours=ours, engine=engine, load_check=check,
                          plain_mismatches=sum(a != b for a, b in zip(spec, plain)),
                          ours_mismatches=sum(a != b for a, b in zip(spec, ours.outputs)))
