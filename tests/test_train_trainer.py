"""Trainer end to end on the tiny model: the loss falls, the export loads in transformers with identical logits,
an interrupted run resumes bit-identically, the CLI runs DPO with LoRA, configs are validated."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import qwenvl
from qwenvl.errors import ConfigError
from qwenvl.model import Qwen25VL
from qwenvl.train import TrainConfig, train
from qwenvl.train.cli import main as cli_main, recipes

VS, VE, IMG = 151652, 151653, 151655


def _fast_big_allocations():
    # The tiny model still has two 151936 x 64 matrices; glibc returns freed blocks over 32 MB to the OS and every
    # new one page-faults again (slow in VMs). Keeping them in the heap makes these CPU tests ~2x faster.
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except OSError:
        pass


_fast_big_allocations()

SFT = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}]},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}]},
    {"images": ["x.png"], "messages": [{"role": "user", "content": "<image>What is in the picture?"},
                                       {"role": "assistant", "content": "Random coloured noise."}]},
    {"messages": [{"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "C, A, T."}]},
    {"text": "The quick brown fox jumps over the lazy dog."},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (56, 84, 3), generator=g, dtype=torch.uint8).numpy()).save(d / "x.png")
    with open(d / "sft.jsonl", "w") as f:
        for r in SFT:
            f.write(json.dumps(r) + "\n")
    with open(d / "dpo.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"}],
                                "chosen": f"A good answer {i}.", "rejected": "No."}) + "\n")
        f.write(json.dumps({"images": ["x.png"], "messages": [{"role": "user", "content": "<image>What is it?"}],
                            "chosen": "Noise.", "rejected": "A dog."}) + "\n")
    return d


def logged(out_dir, key):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def losses(out_dir):
    return logged(out_dir, "loss")


def test_loss_falls_and_the_export_loads_in_transformers(data, tmp_path):

    cfg = TrainConfig(model="tiny", train_files=[str(data / "sft.jsonl")], output_dir=str(tmp_path / "run"),
                      lr=1e-2, warmup_steps=2, max_steps=16, pack_length=512, save_every=1000, resume=False)
    summary = train(cfg)
    curve = losses(cfg.output_dir)
    assert len(curve) == 16 and curve[0] > 10.0  # ln(151936) = 11.9 at random init
    assert curve[-1] < 4.0, curve
    log = json.loads(open(tmp_path / "run" / "log.jsonl").readline())
    assert {"loss", "lr", "tokens_per_s", "memory_gb", "grad_norm", "rows_via", "pixel_mb"} <= set(log)
    # no data workers: rows built in the training process; the image's uint8 frames (56 x 84 x 3) counted
    assert set(summary["data_transport"]["rows_via"]) == {"main"}
    assert summary["data_transport"]["rows_via"]["main"] == sum(v["main"] for v in logged(cfg.output_dir, "rows_via"))
    assert sum(logged(cfg.output_dir, "pixel_mb")) * 2**20 % (56 * 84 * 3) == 0 < sum(logged(cfg.output_dir, "pixel_mb"))

    final = summary["final"]
    assert json.load(open(os.path.join(final, "preprocessor_config.json")))["max_pixels"] == cfg.max_pixels
    assert_transformers_logits_equal(final)


@pytest.mark.parametrize("variant", ["full", "lora", "bf16", "lora_bf16"])
def test_resume_after_interruption_is_bit_identical(data, tmp_path, variant):
    lora = {"lora_r": 4, "lora_dropout": 0.1, "lr": 1e-3}
    extra = {"full": {"lr": 1e-3, "freeze_vit": True}, "lora": lora,
             "bf16": {"lr": 1e-3, "freeze_vit": True, "param_dtype": "bf16"},
             "lora_bf16": {**lora, "param_dtype": "bf16"}}[variant]
    common = dict(model="tiny", train_files=[str(data / "sft.jsonl")], pack_length=96, chunk_size=4, grad_accum=2,
                  max_steps=5, save_every=2, warmup_steps=1, export=False, **extra)
    a = TrainConfig(output_dir=str(tmp_path / "a"), **common)
    train(a)
    b = TrainConfig(output_dir=str(tmp_path / "b"), **common)
    assert train(b, stop_after=3)["step"] == 3  # checkpoint at 2, step 3 is lost with the "crash"
    assert train(b)["step"] == 5  # resumes from step 2
    pa = load_file(tmp_path / "a" / "checkpoints" / "step_00000005" / "trainable.safetensors")
    pb = load_file(tmp_path / "b" / "checkpoints" / "step_00000005" / "trainable.safetensors")
    assert pa.keys() == pb.keys() and len(pa) > 0
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert losses(a.output_dir) == losses(b.output_dir) and len(losses(b.output_dir)) == 5
    assert {v.dtype for v in pa.values()} == {torch.float32}  # bf16: the fp32 master weights
    if variant.endswith("bf16"):  # the optimizer state too: master copies (the same values) and moments in fp32
        oa, ob = (torch.load(tmp_path / k / "checkpoints" / "step_00000005" / "optimizer.pt", weights_only=True)
                  for k in ("a", "b"))
        assert {k for s in oa["state"].values() for k in s} == {"step", "master", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) and oa["state"][i][k].dtype == torch.float32
                   for i in oa["state"] for k in ("master", "exp_avg", "exp_avg_sq"))
    if variant.startswith("lora"):
        assert all("lora_" in k for k in pa)
    else:
        assert not any(k.startswith("visual.blocks") for k in pa)  # the frozen ViT is not saved (it is the base)


def test_param_dtype_bf16_trains_bf16_weights_and_exports_their_fp32_masters(data, tmp_path, monkeypatch):
    """param_dtype=bf16: every parameter is bf16 while training, MasterAdamW keeps fp32 masters; the loss falls as in
    the fp32 run and the export holds the masters in fp32 (the fp32 path's files), loadable by transformers."""
    from qwenvl.train import trainer
    from qwenvl.train.master_adamw import MasterAdamW

    built, build = {}, trainer.build_optimizer

    def recording_build(model, cfg, device):
        built["model"], built["opt"] = model, build(model, cfg, device)
        return built["opt"]

    monkeypatch.setattr(trainer, "build_optimizer", recording_build)
    cfg = TrainConfig(model="tiny", train_files=[str(data / "sft.jsonl")], output_dir=str(tmp_path / "run"),
                      lr=1e-2, warmup_steps=2, max_steps=16, pack_length=512, save_every=1000, resume=False,
                      param_dtype="bf16", freeze_vit=True)
    summary = train(cfg)
    curve = losses(cfg.output_dir)
    assert len(curve) == 16 and curve[0] > 10.0
    assert curve[-1] < 4.0, curve
    model, opt = built["model"], built["opt"]
    assert isinstance(opt, MasterAdamW)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # frozen (the ViT) and trained

    final = summary["final"]
    exported = Qwen25VL.from_pretrained(final, dtype=torch.float32).state_dict()
    masters = {n: opt.state[p]["master"] for n, p in model.named_parameters() if p.requires_grad}
    assert masters and any(n.startswith("visual.blocks") for n in set(exported) - set(masters))
    for n, p in model.named_parameters():  # trained: the master; frozen: the bf16 value upcast
        assert torch.equal(exported[n], masters[n] if n in masters else p.float()), n
        assert n not in masters or torch.equal(p, masters[n].to(torch.bfloat16)), n
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters.values())  # finer than bf16
    assert {str(load_file(f)[k].dtype) for f in _safetensors(final) for k in load_file(f)} == {"torch.float32"}
    assert_transformers_logits_equal(final)


def test_param_dtype_bf16_sums_micro_batch_gradients_in_fp32(data, tmp_path, monkeypatch):
    """grad_accum > 1 with bf16 parameters: after every row's backward the trainer hands the gradients to MasterAdamW's
    fp32 sums, so the step sees the fp32 sum (the sum itself is tested in test_train_master_adamw.py)."""
    from qwenvl.train.master_adamw import MasterAdamW

    calls, seen, accumulate, step = [], [], MasterAdamW.accumulate_grads, MasterAdamW.step

    def counting_accumulate(self):
        calls.append(sum(p.grad is not None for g in self.param_groups for p in g["params"]))
        accumulate(self)

    def checking_step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        # (a parameter no row reached, the merger in a step without images, gets zeros in p.grad as in the fp32 path)
        seen.append({(p.grad is None, self.grad(p).dtype) for p in params if p.grad is None or p.grad.any()})
        return step(self, closure)

    monkeypatch.setattr(MasterAdamW, "accumulate_grads", counting_accumulate)
    monkeypatch.setattr(MasterAdamW, "step", checking_step)
    cfg = TrainConfig(model="tiny", train_files=[str(data / "sft.jsonl")], output_dir=str(tmp_path / "run"),
                      lr=1e-3, warmup_steps=1, max_steps=3, pack_length=96, chunk_size=4, grad_accum=2,
                      save_every=1000, resume=False, export=False, param_dtype="bf16", freeze_vit=True)
    train(cfg)
    assert len(calls) == 6 and min(calls) > 0  # two rows per step, each with gradients
    assert seen == [{(True, torch.float32)}] * 3  # every parameter's step gradient is its fp32 sum


def test_lora_with_bf16_base_saves_master_adapters_that_peft_loads(data, tmp_path):
    """LoRA + param_dtype=bf16: the frozen base is bf16, the adapter file holds the adapters' fp32 masters, and peft
    puts it on transformers' model of the bf16-rounded base with the logits of our merged export."""
    peft = pytest.importorskip("peft")
    from transformers import Qwen2_5_VLForConditionalGeneration

    from reference import hf_model

    base = tmp_path / "base"
    hf_model(qwenvl.preset("tiny")).save_pretrained(base)
    cfg = TrainConfig(model=str(base), train_files=[str(data / "sft.jsonl")], output_dir=str(tmp_path / "run"),
                      lr=1e-2, warmup_steps=1, max_steps=3, pack_length=256, save_every=1000, resume=False,
                      lora_r=4, param_dtype="bf16")
    final = train(cfg)["final"]
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert adapter and {v.dtype for v in adapter.values()} == {torch.float32}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in adapter.values())  # masters, finer than bf16

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():  # the base the adapters were trained on
            p.copy_(p.bfloat16().float())
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "run" / "adapter").eval()
    merged = Qwen25VL.from_pretrained(final, dtype=torch.float32)
    x = image_prompt()
    with torch.no_grad():
        assert (hf(**x).logits - merged(**x)).abs().max().item() < 1e-4


def image_prompt() -> dict:
    """A chat prompt with one 4x6-patch image (random pixels) for the tiny model."""
    ids = [151644, 872, 198, VS] + [IMG] * 6 + [VE, 3838, 374, 304, 279, 6802, 30, 151645, 198, 151644, 77091, 198]
    return dict(input_ids=torch.tensor([ids]), pixel_values=torch.randn(24, 1176), image_grid_thw=torch.tensor([[1, 4, 6]]))


def assert_transformers_logits_equal(final):
    """The exported folder loads in transformers and gives our logits (fp32, an image + text prompt)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(final, torch_dtype=torch.float32).eval()
    ours = Qwen25VL.from_pretrained(final, dtype=torch.float32)
    x = image_prompt()
    with torch.no_grad():
        assert (hf(**x).logits - ours(**x)).abs().max().item() < 1e-4


def _safetensors(folder):
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]


def test_param_dtype_bf16_dpo_reference_is_the_bf16_policy(data, tmp_path):
    """The frozen DPO reference is a bf16 copy too: at the first step policy and reference give the same
    log-probabilities, so the loss is exactly -log sigmoid(0)."""
    import math

    cfg = TrainConfig(model="tiny", stage="dpo", train_files=[str(data / "dpo.jsonl")], output_dir=str(tmp_path / "dpo"),
                      max_steps=1, lr=1e-3, pack_length=256, save_every=0, export=False, resume=False,
                      param_dtype="bf16")
    assert train(cfg)["step"] == 1
    assert losses(cfg.output_dir)[0] == pytest.approx(math.log(2), abs=1e-6)


def test_param_dtype_is_validated(monkeypatch):
    with pytest.raises(ConfigError, match="param_dtype must be fp32 or bf16"):
        TrainConfig(param_dtype="fp16")
    with pytest.raises(ConfigError, match="param_dtype=bf16 needs precision=bf16"):
        TrainConfig(param_dtype="bf16", precision="fp32")
    assert TrainConfig.load(None, ["param_dtype=bf16"]).param_dtype == "bf16" and TrainConfig().param_dtype == "fp32"
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: refused before any process group or model
    with pytest.raises(ConfigError, match="FSDP"):
        train(TrainConfig(model="tiny", param_dtype="bf16"))


def test_fsdp_on_two_processes_matches_one_process_with_accumulation(data, tmp_path):
    """torchrun, 2 CPU processes (gloo), FSDP2: world 2 x accum 1 runs the same bins per step as world 1 x accum 2.
    Only one rank gets the image row in a step: the other runs the ViT on a dummy so the collectives match."""
    common = ["model=tiny", f"train_files=[{data / 'sft.jsonl'}]", "max_steps=3", "save_every=3", "pack_length=96",
              "chunk_size=4", "lr=1e-3", "export=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "qwenvl.train.cli", *common, f"output_dir={tmp_path / 'fsdp'}"],
                   check=True, env=env, timeout=600, capture_output=True)
    train(TrainConfig.load(None, common + [f"output_dir={tmp_path / 'single'}", "grad_accum=2"]))
    pf = load_file(tmp_path / "fsdp" / "checkpoints" / "step_00000003" / "trainable.safetensors")
    ps = load_file(tmp_path / "single" / "checkpoints" / "step_00000003" / "trainable.safetensors")
    assert pf.keys() == ps.keys()
    # Adam divides by the gradient's own scale, so the gradient norm (logged before clipping) is what shows that
    # ranks' contributions are summed exactly once; parameters then agree up to Adam's amplified rounding.
    assert logged(tmp_path / "fsdp", "grad_norm") == pytest.approx(logged(tmp_path / "single", "grad_norm"), rel=1e-4)
    assert logged(tmp_path / "fsdp", "loss") == pytest.approx(logged(tmp_path / "single", "loss"), abs=1e-5)
    assert max((pf[k] - ps[k]).abs().max().item() for k in pf) < 1e-4  # lr is 1e-3


def test_cli_runs_dpo_with_lora_and_writes_a_peft_adapter(data, tmp_path, capsys):
    out = tmp_path / "dpo"
    rc = cli_main(["dpo", "model=tiny", f"train_files=[{data / 'dpo.jsonl'}]", f"output_dir={out}", "max_steps=2",
                   "lora_r=4", "lr=1e-3", "warmup_steps=0", "pack_length=256", "activation_checkpointing=true"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["skipped"] == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert abs(log[0]["loss"] - 0.6931) < 1e-3  # policy == reference at the start: -log sigmoid(0)
    assert "reward_accuracy" in log[0]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "final" / "config.json").exists()


def test_patch_embed_lr_puts_the_patch_embedding_in_its_own_group():
    from qwenvl.train.trainer import build_optimizer

    model = Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.float32, seed=0)
    names = {id(p): n for n, p in model.named_parameters()}

    def groups(**kw):
        opt = build_optimizer(model, TrainConfig(model="tiny", lr=1e-3, vit_lr=2e-4, **kw), torch.device("cpu"))
        return {g["name"]: (g["lr"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups}

    plain, split = groups(), groups(patch_embed_lr=1e-5)
    assert "patch_embed" not in plain and "visual.patch_embed.proj.weight" in plain["vit"][1]
    assert split["patch_embed"] == (1e-5, ["visual.patch_embed.proj.weight"])
    assert split["vit"] == (2e-4, [n for n in plain["vit"][1] if n != "visual.patch_embed.proj.weight"])
    assert split["merger"][0] == 1e-3 and split["llm"][0] == 1e-3
    assert sum(len(ps) for _, ps in split.values()) == sum(len(ps) for _, ps in plain.values())
    with pytest.raises(ConfigError, match="patch_embed_lr"):
        TrainConfig(patch_embed_lr=-1.0)


def test_config_validation_and_recipes(tmp_path):
    assert {"stage1_vit_merger", "stage2_multimodal", "stage3_long_context", "sft", "lora", "dpo"} <= set(recipes())
    cfg = TrainConfig.load("stage3_long_context", ["max_steps=7", "lr=3e-5"])
    assert cfg.pack_length == 32768 and cfg.max_steps == 7 and cfg.lr == 3e-5 and cfg.effective_loss_on == "all"
    with pytest.raises(ConfigError, match="unknown option"):
        TrainConfig.load(None, ["learning_rate=1"])
    with pytest.raises(ConfigError, match="stage"):
        TrainConfig(stage="rlhf")
    with pytest.raises(ConfigError, match="nothing to train"):
        TrainConfig(freeze_vit=True, freeze_merger=True, freeze_llm=True)
    with pytest.raises(ConfigError, match="dpo_sft_weight must be >= 0"):
        TrainConfig.load("dpo", ["dpo_sft_weight=-0.5"])


def test_time_budget_stops_saves_and_exports_with_a_time_cosine(data, tmp_path):
    from qwenvl.train.trainer import lr_factor

    cfg = TrainConfig(model="tiny", train_files=[str(data / "sft.jsonl")], output_dir=str(tmp_path / "run"),
                      lr=1e-3, warmup_steps=2, max_steps=10**6, max_train_seconds=4.0, pack_length=96, chunk_size=4,
                      save_every=10**6, data_workers=2, resume=False)
    # warmup ramp (steps) times the cosine over the wall-clock budget
    assert lr_factor(0, cfg, 0.0) == 0.5 and lr_factor(5, cfg, 2.0) == pytest.approx(0.5)
    assert lr_factor(5, cfg, 4.0) == 0.0 and lr_factor(5, cfg, None) == pytest.approx(1.0, abs=1e-9)
    summary = train(cfg)
    assert summary["stopped"] == "time" and 1 < summary["step"] < 10**6 and summary["final"]
    lrs = [x["llm"] for x in logged(cfg.output_dir, "lr")]
    assert lrs[-1] < 0.3 * max(lrs) and max(lrs) <= 1e-3
    assert logged(cfg.output_dir, "elapsed_s")[-1] >= 4.0
    state = json.load(open(tmp_path / "run" / "checkpoints" / f"step_{summary['step']:08d}" / "state.json"))
    assert state["elapsed"] >= 4.0  # a resume continues the budget
    # rows came from the data workers, through shared memory or the pipe, and the log says which
    via = summary["data_transport"]["rows_via"]
    assert set(via) <= {"shm", "file", "pipe"} and sum(via.values()) == sum(sum(v.values()) for v in logged(cfg.output_dir, "rows_via"))


def test_nano_preset_trains_with_its_pruned_tokenizer_and_exports_it(data, tmp_path):
    from qwenvl.processor import Processor

    NANO_DIR = pytest.importorskip("qwenvl.nano").NANO_DIR

    cfg = TrainConfig(model="nano", train_files=[str(data / "sft.jsonl")], output_dir=str(tmp_path / "run"),
                      lr=1e-3, max_steps=2, pack_length=512, save_every=0, resume=False, rope_theta=100.0)
    summary = train(cfg)
    final = summary["final"]
    assert summary["step"] == 2 and summary["skipped"] == 0
    assert json.load(open(os.path.join(final, "config.json")))["rope_theta"] == 100.0  # travels with the weights
    with pytest.raises(ConfigError, match="rope_theta"):  # trained weights keep the theta they were trained with
        train(TrainConfig(model=final, train_files=[str(data / "sft.jsonl")], output_dir=str(tmp_path / "again"),
                          max_steps=1, pack_length=512, save_every=0, resume=False, rope_theta=1e6))
    # unless asked to re-base it: then the checkpoint trains on the new base, and the export carries it
    again = train(TrainConfig(model=final, train_files=[str(data / "sft.jsonl")], output_dir=str(tmp_path / "rebased"),
                              max_steps=1, pack_length=512, save_every=0, resume=False, rope_theta=30.0,
                              rebase_rope=True))
    assert json.load(open(os.path.join(again["final"], "config.json")))["rope_theta"] == 30.0
    assert json.load(open(os.path.join(final, "vocab_map.json"))) == json.load(open(os.path.join(NANO_DIR, "vocab_map.json")))
    proc = Processor.from_pretrained(final)
    assert proc.tokenizer.token_to_id("<|image_pad|>") == 8182
    model = Qwen25VL.from_pretrained(final, dtype=torch.float32)
    assert model.config.text.vocab_size == 8192 and model.config.image_token_id == 8182
    # a tokenizer whose vision ids are not the model's is refused before training
    with pytest.raises(ConfigError, match="does not match the model config"):
        train(TrainConfig(model="tiny", tokenizer=NANO_DIR, train_files=[str(data / "sft.jsonl")],
                          output_dir=str(tmp_path / "bad"), max_steps=1))


def test_compiled_blocks_train_like_eager(data, tmp_path, monkeypatch):
    """compile=True (torch.compile per decoder layer / ViT block, under activation checkpointing) follows the same
    loss curve and ends at the same weights as eager: a wrong graph (lost mask, stale recompiled shape) would not.
    On the CPU through the aot_eager backend (dynamo capture + AOT autograd, the parts that can break a model;
    inductor's C++ codegen would cost minutes here); with inductor on CUDA in test_train_cuda.py."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    common = dict(model="tiny", train_files=[str(data / "sft.jsonl")], pack_length=128, chunk_size=6, lr=1e-3,
                  max_steps=3, warmup_steps=0, save_every=3, export=False, resume=False, activation_checkpointing=True)
    eager, compiled = (TrainConfig(output_dir=str(tmp_path / k), compile=k == "compiled", **common)
                       for k in ("eager", "compiled"))
    train(eager)
    train(compiled)
    le, lc = losses(eager.output_dir), losses(compiled.output_dir)
    assert len(le) == 3 and max(abs(a - b) / a for a, b in zip(le, lc)) < 1e-4, (le, lc)
    pe, pc = (load_file(tmp_path / k / "checkpoints" / "step_00000003" / "trainable.safetensors")
              for k in ("eager", "compiled"))
    assert pe.keys() == pc.keys() and any(k.startswith("visual.blocks") for k in pe)
    assert max((pe[k] - pc[k]).abs().max().item() for k in pe) < 1e-4


def test_compiled_blocks_do_not_recompile_per_packed_row():
    """Packed rows hold different numbers of samples, images different numbers of windows: a compiled decoder layer
    or ViT block compiles once (dynamic shapes) and serves them all. Traced, the attention's segment list guarded on
    its length and recompiled for each new sample count (H100 2026-12-05: 6 s steps between 0.5 s ones)."""
    import random

    from qwenvl.layers import segments
    from qwenvl.model import Qwen25VL
    from qwenvl.train.trainer import compile_blocks

    model = Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.float32, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        compile_blocks(model)
    torch._dynamo.reset()
    layer, block, c = model.model.layers[0], model.visual.blocks[0], model.config
    rng = random.Random(0)
    for i, n in enumerate((2, 5, 3, 8)):
        T = 96 + 16 * i
        cu = torch.tensor([0] + sorted(rng.sample(range(1, T), n - 1)) + [T])
        seg = segments(cu, "cpu")
        x = torch.randn(1, T, c.text.hidden_size, requires_grad=True)
        cos, sin = torch.randn(1, T, c.text.head_dim), torch.randn(1, T, c.text.head_dim)
        v = torch.randn(T, c.vision.hidden_size, requires_grad=True)
        rot = torch.randn(T, c.vision.hidden_size // c.vision.num_heads)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            layer(x, cos, sin, seg, None, 0).sum().backward()
            block(v, seg, rot.cos(), rot.sin()).sum().backward()


def test_checkpoint_layers_recompute_some_layers_with_the_same_gradients():
    """checkpoint_layers=N: N decoder layers, spread evenly, recompute in backward (all ViT blocks do); the loss and
    gradients are those of the model without checkpointing."""
    import functools as ft

    from qwenvl.train.trainer import checkpointed_layer_indexes, enable_activation_checkpointing

    assert checkpointed_layer_indexes(36, 24) == [i * 3 // 2 for i in range(24)]
    assert checkpointed_layer_indexes(36, None) == list(range(36)) == checkpointed_layer_indexes(36, 99)
    assert checkpointed_layer_indexes(36, 0) == [] and checkpointed_layer_indexes(36, 4) == [0, 9, 18, 27]
    cfg = qwenvl.preset("tiny")
    plain, ckpt = (Qwen25VL.random(cfg, dtype=torch.float32, seed=0) for _ in range(2))
    enable_activation_checkpointing(ckpt, layers=1)
    wrapped = [isinstance(layer.forward, ft.partial) for layer in ckpt.model.layers]
    assert wrapped == [i == 0 for i in range(len(wrapped))] and len(wrapped) > 1
    assert all(isinstance(b.forward, ft.partial) for b in ckpt.visual.blocks)
    ids = torch.randint(0, cfg.text.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (plain, ckpt):
        m(ids).float().logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < 1e-6
    with pytest.raises(ConfigError, match="checkpoint_layers"):
        TrainConfig(model="tiny", checkpoint_layers=-1).validate()


def test_profile_step_writes_the_ops_of_that_step(data, tmp_path, monkeypatch):
    monkeypatch.setenv("QWENVL_PROFILE_STEP", "2")
    cfg = TrainConfig(model="tiny", train_files=[str(data / "sft.jsonl")], output_dir=str(tmp_path / "run"),
                      max_steps=3, pack_length=96, chunk_size=4, save_every=0, export=False, resume=False)
    train(cfg)
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("profile")) == ["profile_step2.txt"]
    text = open(tmp_path / "run" / "profile_step2.txt").read()
    assert text.startswith("profiled step:") and "aten::mm" in text  # forward/backward matmuls of that step
    assert "Optimizer.step" in text or "adamw" in text.lower()  # the optimizer is inside the profiled window


def test_cuda_allocator_defaults_to_expandable_segments_unless_configured(monkeypatch):
    import torch

    from qwenvl.train import trainer

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert trainer.cuda_allocator_defaults() is True
    assert calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # the user's choice stands
    assert trainer.cuda_allocator_defaults() is False
    assert calls == ["expandable_segments:True"]
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # the newer name
    assert trainer.cuda_allocator_defaults() is False
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer.cuda_allocator_defaults() is False


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("max_norm", [0.5, 0.0, 1e9])
def test_clipping_folded_into_fused_adamw_matches_clip_grad_norm(max_norm, device, monkeypatch):
    from qwenvl.train.trainer import _clip, fused_adam_scales_grads

    monkeypatch.setenv("QWENVL_FUSED_CLIP", "1")

    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    init = [torch.randn(s, generator=g, device=device) for s in shapes]
    grads = [[torch.randn(s, generator=g, device=device) * 3 for s in shapes] for _ in range(3)]
    runs = {}
    for folded in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        norms = []
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.clone()
            if folded:
                assert fused_adam_scales_grads(opt, params)
                norms.append(float(_clip(params, max_norm, opt)))
            else:
                norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))))
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[folded] = ([p.detach() for p in params], norms)
    (folded_params, folded_norms), (plain_params, plain_norms) = runs[True], runs[False]
    assert folded_norms == pytest.approx(plain_norms, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(folded_params, plain_params))
    moved = max((a - b).abs().max().item() for a, b in zip(folded_params, init))
    assert moved > 1e-3  # the steps did something
    plain_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=False)
    assert not fused_adam_scales_grads(plain_opt, plain_opt.param_groups[0]["params"])
    for p, gr in zip(params, grads[0]):
        p.grad = gr.clone()
    monkeypatch.delenv("QWENVL_FUSED_CLIP")  # on by default
    assert fused_adam_scales_grads(opt, params)
    monkeypatch.setenv("QWENVL_FUSED_CLIP", "0")
    assert not fused_adam_scales_grads(opt, params)


def test_step_numbers_read_one_step_late_log_every_step_as_a_synced_run(data, tmp_path, monkeypatch):
    """By default the loop reads each step's loss and gradient norm after queuing the next step (QWENVL_STEP_SYNC=1:
    at once): the same log lines, each step once and in order, across a checkpoint and an interruption."""
    common = dict(model="tiny", train_files=[str(data / "sft.jsonl")], pack_length=96, chunk_size=4, max_steps=5,
                  save_every=2, warmup_steps=1, lr=1e-3, export=False)
    logs = {}
    for sync in ("1", "0"):
        monkeypatch.setenv("QWENVL_STEP_SYNC", sync)
        cfg = TrainConfig(output_dir=str(tmp_path / sync), **common)
        assert train(cfg, stop_after=3)["step"] == 3
        assert train(cfg)["step"] == 5
        logs[sync] = [json.loads(line) for line in open(tmp_path / sync / "log.jsonl")]
    assert [e["step"] for e in logs["0"]] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm", "tokens", "lr"):
        assert [e[key] for e in logs["0"]] == [e[key] for e in logs["1"]], key
    assert all(e["step_s"] > 0 and e["grad_norm"] > 0 for e in logs["0"])
