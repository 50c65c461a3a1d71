"""Size everything before any work (llama.cpp's preliminary pass): every tensor's candidates and bytes, the
feasible bits-per-weight range, and the memory the run will need against what the machine has.

Nothing here reads a weight: shapes and dtypes come from the lazily built model. An infeasible target and
a machine too small for the run are refused here, with the numbers, before any pass starts.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

from mixq.core.errors import MixqError
from mixq.core.formats import Format, applicable, dtype_itemsize, tensor_bytes
from mixq.core.head import chunk_rows
from mixq.core.lanes import LANE_BYTES, lane_count
from mixq.quant.distill import LOGITS_BYTES, DistillSettings, batch_size as distill_batch
from mixq.quant.hessian import block_gram_bytes, kept_gram_bytes
from mixq.quant.plan import candidate_items, fixed_bytes

ACTIVATIONS_PER_BLOCK = 24   # hidden-wide float32 arrays a block keeps per token for a backward (MLP 4x wide)
STREAM_ABOVE = 1 << 30       # stored bytes above which --stream-weights auto streams
PROCESS_BASE = 600 << 20     # python, mlx, tokenizer, code (measured RSS before any weight: ~0.5 GB)
GPTQ_CHUNK = 256 << 20       # row-chunk working set of one GPTQ call (mixq.quant.gptq)
DISTILLATION = "distillation"
OWN_INPUTS = "own inputs"
RESIDENT = "weights (stored dtype)"
DISTILL_STAGE = ("process", RESIDENT, DISTILLATION)   # what is held while --distill runs
# --distill per group, float32: parameters, gradients and Adam's two moments (8), and for the float student the values
# (scale, bias) of every tensor through a step (the quantized one makes them a layer at a time); beside the best
# epoch's scale and bias in the source dtype
TUNED_GROUP_FLOAT32 = {"float": 10, "quantized": 8}


@dataclass
class TensorPlan:
    path: str
    shape: list
    dtype: str
    candidates: dict  # format name -> bytes


@dataclass
class Preflight:
    tensors: list
    fixed_bytes: int
    params: int
    stored_bytes: int
    min_bytes: int
    max_bytes: int
    memory: dict = field(default_factory=dict)   # component -> bytes
    available: int | None = None
    stream_weights: bool = False
    distill_student: str | None = None   # how --distill's student runs (distill.STUDENTS), None without it
    own_inputs_left: int = 0   # --gptq-inputs auto took the float inputs: the bytes the own ones would have added

    @property
    def own_inputs(self) -> bool:
        """The written layers' GPTQ on the quantized model's own inputs (mixq.quant.asymmetric): sized for it."""
        return OWN_INPUTS in self.memory

    def inputs_note(self) -> str:
        """Which inputs GPTQ takes, for the dry run's text and the convert's first line ('' when plain)."""
        if self.own_inputs:
            return "GPTQ on the quantized model's own inputs"
        if self.own_inputs_left:
            return f"GPTQ on the float model's inputs (its own would need {_gb(self.own_inputs_left)} more)"
        return ""

    @property
    def min_bpw(self) -> float:
        return self.min_bytes * 8 / self.params

    @property
    def max_bpw(self) -> float:
        return self.max_bytes * 8 / self.params

    @property
    def sweep(self) -> int:
        """The measuring and writing sweeps' memory: every component but the distillation's."""
        return sum(v for k, v in self.memory.items() if k != DISTILLATION)

    @property
    def distill_stage(self) -> int:
        """--distill's stage, after the sweeps' state is let go: the process, resident weights and its own."""
        if DISTILLATION not in self.memory:
            return 0
        return sum(self.memory.get(k, 0) for k in DISTILL_STAGE)

    @property
    def peak(self) -> int:
        return max(self.sweep, self.distill_stage)

    def check_target(self, target_bpw: float) -> None:
        if target_bpw * self.params / 8 < self.min_bytes:
            raise MixqError(f"target {target_bpw} bpw is infeasible with these candidates: feasible range is "
                            f"{self.min_bpw:.4f} to {self.max_bpw:.4f} bpw")

    def check_memory(self) -> None:
        if self.available is not None and self.peak > self.available:
            raise MixqError(f"this run needs about {_gb(self.peak)} of memory and the machine has {_gb(self.available)} "
                            f"available ({', '.join(f'{k} {_gb(v)}' for k, v in self.memory.items())}); "
                            + ("the distillation stage is the larger: use --distill-student quantized or fewer "
                               "--distill-windows" if self.distill_stage > self.sweep else
                               "use fewer --samples or a shorter --seq-len"
                               + (f", or --gptq-inputs float (own inputs {_gb(self.memory[OWN_INPUTS])})"
                                  if OWN_INPUTS in self.memory else "")))

    def to_dict(self) -> dict:
        return {"params": self.params, "stored_bytes": self.stored_bytes, "fixed_bytes": self.fixed_bytes,
                "feasible_bpw": [self.min_bpw, self.max_bpw], "memory": dict(self.memory), "peak_bytes": self.peak,
                "available_bytes": self.available, "stream_weights": self.stream_weights,
                "distill_student": self.distill_student, "own_inputs": self.own_inputs,
                "tensors": [{"path": t.path, "shape": t.shape, "dtype": t.dtype, "candidates": t.candidates}
                            for t in self.tensors]}


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_memory() -> int | None:
    """Bytes this process can still use: MemAvailable on Linux, the recommended working set on a Mac GPU;
    MIXQ_AVAILABLE_MEMORY (bytes) overrides both (to hold a run to less than the machine has)."""
    if os.environ.get("MIXQ_AVAILABLE_MEMORY"):
        try:
            return int(float(os.environ["MIXQ_AVAILABLE_MEMORY"]))
        except ValueError:
            raise MixqError(f"MIXQ_AVAILABLE_MEMORY must be a number of bytes, got {os.environ['MIXQ_AVAILABLE_MEMORY']!r}")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        got = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if got:
            return int(got)
    except Exception:  # no such device info: no check
        pass
    if sys.platform == "darwin":
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return None


def _block_params(anatomy) -> dict:
    out: dict = {}
    for t in anatomy.tensors:
        if t.layer is not None:
            out[t.layer] = out.get(t.layer, 0) + t.params
    return out


def _block_rows(anatomy, tokens: int, top_k: int) -> dict:
    """Bytes of the per-position (input, output gradient) rows the estimator keeps for one block."""
    out: dict = {}
    for t in anatomy.tensors:
        if t.layer is None or t.module_type not in ("Linear", "SwitchLinear") or not t.path.endswith(".weight"):
            continue
        rows = tokens * (top_k if t.module_type == "SwitchLinear" else 1)
        out[t.layer] = out.get(t.layer, 0) + 4 * rows * (t.shape[-1] + t.shape[-2])
    return out


def _rounding_bytes(anatomy, candidates) -> int:
    """The largest tensor's GPTQ state: its factors (one per expert; a dense H is counted with the second
    moments, an expert's is formed one at a time), one expert's H, its packed result, a row chunk."""
    best = 0
    for t in candidate_items(anatomy):
        if t.module_type not in ("Linear", "SwitchLinear", "Embedding"):
            continue
        slices = t.shape[0] if t.module_type == "SwitchLinear" else 1
        best = max(best, 4 * (slices + 1) * t.shape[-1] ** 2 + t.params + min(GPTQ_CHUNK, 4 * t.params))
    return best


def preflight(anatomy, candidates: list[Format], source_dtypes: dict, *, samples: int, seq_len: int,
              batch_size: int, hidden: int, vocab: int, top_k: int = 1, streams: int = 4, gram_samples: int = 0,
              own_inputs: bool | str = False, stream_weights: str = "auto", available: int | None = -1,
              distill: DistillSettings | None = None, distill_student: str = "auto",
              target_bpw: float | None = None) -> Preflight:
    """Size the run. `streams`: quantized streams an evaluation sweep carries at once; `gram_samples`: the
    windows the write sweep runs beyond the calibration ones for GPTQ's Grams; `own_inputs`: the written
    stream's GPTQ takes its own inputs (mixq.quant.asymmetric), "auto": where the sweeps fit in `available`
    with them (else the float inputs); `top_k`: routed experts
    per token (their input rows are kept for a block); `distill`: the end-to-end stage's settings
    (mixq.quant.distill), None without it; `distill_student` "auto": the float student where it fits in
    `available`, else the quantized one (the written size at `target_bpw` instead of 5 bytes a parameter)."""
    params = anatomy.mlx_lm_params
    fixed = fixed_bytes(anatomy, source_dtypes)
    tensors, lo, hi = [], fixed, fixed
    for t in candidate_items(anatomy):
        src = source_dtypes.get(t.path, t.dtype)
        c = {str(f): tensor_bytes(t.shape, f, src) for f in candidates if applicable(t.shape, f)}
        c.setdefault("float", tensor_bytes(t.shape, Format("float"), src))
        tensors.append(TensorPlan(t.path, list(t.shape), src, c))
        lo += min(c.values())
        hi += max(c.values())
    stored = sum(t.params * dtype_itemsize(source_dtypes.get(t.path, t.dtype)) for t in anatomy.tensors)
    per_block = _block_params(anatomy)
    biggest = max(per_block.values(), default=0)
    grams = max(block_gram_bytes(anatomy).values(), default=0)
    est_rows = max(_block_rows(anatomy, samples * seq_len, top_k).values(), default=0)
    tokens = samples * seq_len
    act = 4 * tokens * hidden
    n_blocks = len(per_block)
    # the head runs in vocabulary chunks (core.head): a chunk's logits ~6 times (mlx and numpy copies, p, d)
    # and its rows in float32, for the reference and the compared head
    positions = batch_size * seq_len
    head_rows = min(vocab, chunk_rows(hidden, positions))
    mem = {
        "process": PROCESS_BASE,
        "block in float32": 4 * biggest + 2 * biggest,   # the compute copy and the stored read it is cast from
        "block inputs (backward)": act * n_blocks,
        "streams": act * (streams + 2),
        # a MoE block's routed input rows are kept for its experts' Grams (the calibration windows')
        "second moments": grams + 4 * tokens * top_k * hidden * 2,
        # for the later sweeps, where all fit; none where the write sweep takes its own over more windows
        "kept second moments": 0 if gram_samples else kept_gram_bytes(anatomy),
        "estimator rows": est_rows,
        "rounding": _rounding_bytes(anatomy, candidates),
        "head": 2 * vocab * hidden + 6 * 4 * positions * head_rows + 2 * 4 * head_rows * hidden,
    }
    if gram_samples:   # their float hidden states through the write sweep
        mem["Gram windows"] = 4 * gram_samples * seq_len * hidden
    if own_inputs:   # mixq.quant.asymmetric: the stream's states on the Gram windows (and their next block's),
        # the float run's input rows of a block's dense layers over every window (each layer's width counted: an
        # upper bound where layers share an input), a group's C and the target's factor of H~ (H~ and GPTQ's factor
        # are counted with the second moments and the rounding), and the largest
        # dense tensor's target W' in its source dtype
        dense = [t for t in candidate_items(anatomy) if t.module_type == "Linear"]
        widest = max((t.shape[-1] for t in dense), default=0)
        widths: dict = {}
        for t in dense:
            if t.layer is not None:
                widths[t.layer] = widths.get(t.layer, 0) + t.shape[-1]
        mem[OWN_INPUTS] = 2 * 4 * gram_samples * seq_len * hidden + \
            4 * (samples + gram_samples) * seq_len * max(widths.values(), default=0) + 2 * 4 * widest ** 2 + \
            max((t.params * dtype_itemsize(source_dtypes.get(t.path, t.dtype)) for t in dense), default=0)
    if top_k > 1:  # MoE: the routers' margin cotangent beside the gradient (mixq.quant.flips)
        mem["router flips"] = act
    if lane_count() > 1:   # batches, tensors and GPTQ row steps side by side on a CPU's cores (core.lanes)
        mem["side by side (lanes)"] = LANE_BYTES
    avail = available_memory() if available == -1 else available
    left = 0
    if own_inputs == "auto" and avail is not None and \
            sum(mem.values()) + (stored if stream_weights == "off" else 0) > avail:
        left = mem.pop(OWN_INPUTS)   # the float inputs: the sweeps would not fit with the own ones
    sweep, student, stage = sum(mem.values()), None, 0   # the sweeps' components, all in `mem` so far
    if distill is not None:   # sized as if the weights stream unless told otherwise (resident only with room)
        student, mem[DISTILLATION] = _distillation(
            distill, distill_student, params, _tuned_bytes(tensors, candidates),
            hi if target_bpw is None else int(target_bpw * params / 8),
            seq_len, hidden, vocab, n_blocks, avail, PROCESS_BASE + (stored if stream_weights == "off" else 0))
        stage = PROCESS_BASE + mem[DISTILLATION]
    if stream_weights == "on":
        streaming = True
    elif stream_weights == "off":
        streaming = False
    else:  # resident only for a small model that leaves ample room: a pass reads each block once, a cost
        # small next to the pass's compute, while a resident copy costs the model's whole size
        streaming = stored > STREAM_ABOVE or (avail is not None and stored + max(sweep, stage) > 0.6 * avail)
    if not streaming:
        mem[RESIDENT] = stored
    return Preflight(tensors=tensors, fixed_bytes=fixed, params=params, stored_bytes=stored, min_bytes=lo,
                     max_bytes=hi, memory=mem, available=avail, stream_weights=streaming,
                     distill_student=student, own_inputs_left=left)


def _tuned_bytes(tensors: list, candidates) -> dict:
    """student -> --distill's tuned state if every quantized tensor took the narrowest affine group of the
    candidates."""
    group = min((f.group_size for f in candidates if f.is_quantized and f.mode == "affine"), default=64)
    out = {}
    for student, f32 in TUNED_GROUP_FLOAT32.items():
        per = {dt: 4 * f32 + 2 * dtype_itemsize(dt) for dt in {t.dtype for t in tensors}}
        out[student] = sum(math.prod(t.shape) // group * per[t.dtype] for t in tensors)
    return out


def _distillation(st: DistillSettings, student: str, params: int, tuned: dict, written: int, seq_len: int,
                  hidden: int, vocab: int, n_blocks: int, avail: int | None, others: int) -> tuple[str, int]:
    """The student --distill runs and its memory: the written arrays, the tuned state (`tuned`: bytes per
    student), the targets and a batch's logits; the float student adds the weights in float32 and the codes
    (5 bytes a parameter) and every block's activations, the quantized one (checkpointed) every block's input
    and one block's activations. "auto": the float student (faster on a CPU) where it fits."""
    b_tokens = distill_batch(st, seq_len, vocab) * seq_len
    common = written + 8 * min(st.top_k, vocab) * (st.windows + st.validation) * seq_len + \
        min(LOGITS_BYTES, 16 * b_tokens * vocab)
    block = ACTIVATIONS_PER_BLOCK * 4 * b_tokens * hidden
    as_float = common + tuned["float"] + 5 * params + block * n_blocks
    as_quantized = common + tuned["quantized"] + 4 * b_tokens * hidden * n_blocks + block
    if student == "auto":
        student = "float" if avail is None or others + as_float <= avail else "quantized"
    return student, as_float if student == "float" else as_quantized


def format_preflight(pf: Preflight, target_bpw: float | None = None) -> str:
    lines = [f"{'tensor':<52} {'shape':>18} {'dtype':>8}  candidates (MB)"]
    for t in pf.tensors:
        cands = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in t.candidates.items())
        lines.append(f"{t.path:<52} {'x'.join(map(str, t.shape)):>18} {t.dtype:>8}  {cands}")
    lines.append("")
    lines.append(f"parameters {pf.params:,} (mlx-lm's count); stored {pf.stored_bytes / 1e9:.3f} GB; fixed (kept float "
                 f"by rule) {pf.fixed_bytes / 1e6:.2f} MB")
    lines.append(f"feasible bits per weight: {pf.min_bpw:.4f} .. {pf.max_bpw:.4f}"
                 + ("" if target_bpw is None else f"  (target {target_bpw}: "
                    + ("feasible)" if target_bpw * pf.params / 8 >= pf.min_bytes else "INFEASIBLE)")))
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in pf.memory.items() if k != DISTILLATION)
    if DISTILLATION in pf.memory:   # a stage of its own: the sweeps' state is let go before it runs
        parts = (f"measuring and writing {_gb(pf.sweep)}: {parts}; then the distillation stage "
                 f"{_gb(pf.distill_stage)}: distillation {_gb(pf.memory[DISTILLATION])} beside the process"
                 + (" and the resident weights" if RESIDENT in pf.memory else ""))
    lines.append(f"memory needed: about {_gb(pf.peak)} (" + parts + ")"
                 + ("" if pf.available is None else f"; available {_gb(pf.available)}")
                 + ("; weights streamed from disk block by block" if pf.stream_weights else "")
                 + (f"; --distill runs the {pf.distill_student} student" if pf.distill_student else "")
                 + (f"; {pf.inputs_note()}" if pf.inputs_note() else ""))
    return "\n".join(lines)

