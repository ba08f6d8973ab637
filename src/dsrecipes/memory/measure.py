"""What each rank really holds: bytes saved for backward, model states per rank, peak RSS.

with SavedActivations(model) as acts:                             # bytes saved for backward by one forward
    loss = model(**batch).loss
states = model_state_bytes(model, optimizer)                      # params/grads/optimizer states per rank
report = measure(model, optimizer, accelerator)                   # the above + peak RSS (+ CUDA peak)
"""

from __future__ import annotations

import contextlib
import resource

import torch

RECORDERS: list = []  # active SavedActivations (DeepSpeed's checkpoint keeps its inputs outside autograd's hooks)


# ============================================================================ activations saved for backward
class SavedActivations:
    """Bytes autograd keeps for backward during one forward (saved-tensor hooks), counted once per storage.
    Parameters are not activations and are skipped; counting stops at the first unpack (backward has begun, so a
    recompute inside backward is not counted as forward memory)."""

    def __init__(self, model=None):
        self.param_storages = set()
        for p in model.parameters() if model is not None else ():
            for t in (p, getattr(p, "ds_tensor", None)):
                if isinstance(t, torch.Tensor) and t.numel():
                    self.param_storages.add(t.untyped_storage().data_ptr())
        self.storages: dict[int, int] = {}
        self.open = True
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def add(self, t) -> None:
        if not self.open or not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        if t.is_leaf and t.requires_grad:  # a parameter (under ZeRO-3 a gathered one)
            return
        st = t.untyped_storage()
        if st.data_ptr() not in self.param_storages:
            self.storages.setdefault(st.data_ptr(), st.nbytes())

    def _pack(self, t):
        self.add(t)
        return t

    def _unpack(self, t):
        self.open = False
        return t

    def __enter__(self):
        RECORDERS.append(self)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        RECORDERS.remove(self)
        return False


# ============================================================================ model states per rank
def _storages(t) -> list:
    """(data_ptr, nbytes) of the storages behind a tensor; quantized tensor subclasses (torchao's 8/4-bit optimizer
    states) are flattened to their inner tensors, whose storages are the real memory."""
    from dsrecipes.compat import is_traceable_wrapper_subclass

    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return []
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [s for n in names for s in _storages(getattr(t, n))]
    st = t.untyped_storage()
    return [(st.data_ptr(), st.nbytes())] if st.data_ptr() else []


def _unwrap_optimizer(optimizer):
    """accelerate's AcceleratedOptimizer / DeepSpeedOptimizerWrapper -> the engine's optimizer (ZeRO) or torch's."""
    opt = optimizer
    while opt is not None and type(opt).__module__.startswith("accelerate") and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _walk(obj, path: str, out: list, depth: int, seen: set) -> None:
    """Every tensor an optimizer object holds, with its attribute path (containers and DeepSpeed objects only)."""
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        if obj.grad is not None:
            out.append((path + ".grad", obj.grad))
        return
    if depth == 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif type(obj).__module__.startswith("deepspeed.runtime") and hasattr(obj, "__dict__"):
        items = ((k, v) for k, v in vars(obj).items() if k not in ("optimizer", "module", "timers", "param_names"))
    else:
        return
    for key, value in items:
        _walk(value, f"{path}.{key}", out, depth - 1, seen)


def model_state_bytes(model, optimizer=None) -> dict:
    """Bytes this rank holds now, read from the real tensors, each storage counted once:
    parameters (under ZeRO-3 the local `ds_tensor` partition plus any gathered/persistent ones), gradients (`.grad`,
    DeepSpeed's averaged/partitioned gradient buffers), optimizer states (the torch optimizer's state plus DeepSpeed's
    fp32 master partition: `single_partition_of_fp32_groups` under ZeRO-1/2, `fp32_partitioned_groups_flat` under
    ZeRO-3, which shares the parameter partition in fp32 training), and buffers (communication buckets, other)."""
    seen: dict[int, str] = {}
    out = {"parameters": 0, "gradients": 0, "optimizer_states": 0, "master_weights": 0, "buffers": 0}

    def count(t, kind):
        for ptr, nbytes in _storages(t):
            if ptr not in seen:
                seen[ptr] = kind
                out[kind] += nbytes
                if kind == "optimizer_states" and kind_master[0]:
                    out["master_weights"] += nbytes

    kind_master = [False]
    params = list(model.parameters()) if model is not None else []
    for p in params:
        count(p, "parameters")
        count(getattr(p, "ds_tensor", None), "parameters")
    for p in params:
        count(p.grad, "gradients")
    opt = _unwrap_optimizer(optimizer)
    inner = getattr(opt, "optimizer", None) if not isinstance(opt, torch.optim.Optimizer) else opt
    if isinstance(inner, torch.optim.Optimizer):
        for group in inner.param_groups:  # DeepSpeed's master partitions are the inner optimizer's params
            for p in group["params"]:
                kind_master[0] = True
                count(p, "optimizer_states")
                kind_master[0] = False
                count(p.grad, "gradients")
        for st in inner.state.values():
            for v in st.values():
                count(v, "optimizer_states")
    if opt is not None and not isinstance(opt, torch.optim.Optimizer):  # a DeepSpeed ZeRO / bf16 optimizer
        found: list = []
        _walk(opt, "", found, depth=5, seen=set())
        for path, t in found:
            low = path.lower()
            if "grad" in low:
                count(t, "gradients")
            elif any(w in low for w in ("fp32", "master", "single_partition")):
                kind_master[0] = True
                count(t, "optimizer_states")
                kind_master[0] = False
            else:
                count(t, "buffers")
    out["model_states"] = out["parameters"] + out["gradients"] + out["optimizer_states"]
    return out


# ============================================================================ one training step, measured
class StepProbe:
    """Wraps the first micro-batch of a recipe: activation bytes (saved-tensor hooks), and the model states at the
    moment the optimizer steps (gradients alive) of the second step. Under DeepSpeed, accelerate runs the engine's
    step inside backward(), so the snapshot wraps the engine optimizer's step() for those calls."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.result, self._done = model, optimizer, {}, False

    @contextlib.contextmanager
    def first_micro_batch(self):
        if self._done:
            yield self
            return
        self._done = True
        self._hook_step()
        acts = SavedActivations(self.model)
        try:
            with acts:
                yield self
        finally:
            self.result["activation_bytes_per_micro_batch"] = acts.bytes

    def _hook_step(self, calls: int = 2) -> None:
        """Snapshots for the first `calls` optimizer steps; the largest of the last one is kept (the first step has
        no Adam state yet). DeepSpeed ZeRO-1 holds the full gradients until reduce_gradients(), so that call is a
        snapshot point too."""
        opt = _unwrap_optimizer(self.optimizer)
        cycles: dict[int, dict] = {}
        done = [0]  # optimizer steps taken so far

        def release():  # measured: drop the references, or a rebuilt engine's predecessor would stay alive
            self.model = self.optimizer = None

        def snapshot():
            snap = model_state_bytes(self.model, self.optimizer)
            if done[0] not in cycles or snap["model_states"] > cycles[done[0]]["model_states"]:
                cycles[done[0]] = snap
            self.result["at_step"] = cycles[max(cycles)]

        if isinstance(opt, torch.optim.Optimizer):

            def pre_hook(*_):
                snapshot()
                done[0] += 1
                if done[0] == calls:
                    handle.remove()
                    release()

            handle = opt.register_step_pre_hook(pre_hook)
            return
        # a DeepSpeed optimizer (not a torch.optim.Optimizer): wrap its methods on the instance for those steps
        names = [n for n in ("reduce_gradients", "step") if callable(getattr(opt, n, None))]
        originals = {n: (getattr(opt, n), n in vars(opt)) for n in names}

        def wrapped(name):
            def call(*args, **kwargs):
                snapshot()
                if name == "step":
                    done[0] += 1
                    if done[0] == calls:
                        for n, (orig, own) in originals.items():  # back to the original methods
                            if own:
                                setattr(opt, n, orig)
                            else:
                                delattr(opt, n)
                        release()
                return originals[name][0](*args, **kwargs)

            return call

        for n in names:
            setattr(opt, n, wrapped(n))


# ============================================================================ process-level figures
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(model, optimizer, accelerator=None, probe: StepProbe | None = None) -> dict:
    """Per-rank bytes held now (and at the first optimizer step if a probe ran), peak RSS, CUDA peak."""
    now = model_state_bytes(model, optimizer)
    out = {
        "param_bytes": now["parameters"],
        "optimizer_state_bytes": now["optimizer_states"],
        "now": now,
        "peak_rss_mb": peak_rss_mb(),
    }
    if probe is not None:
        out.update(probe.result)
    if torch.cuda.is_available():
        out["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
