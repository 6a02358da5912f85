"""DiP model tests: exact parameter counts, the forward/backward against an independent functional
implementation written from the paper's spec, every head variant, the official-weights loader,
input checks, torch.compile and gradient checkpointing."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import dip_kernels
from dip import models
from dip_kernels.testing import assert_close_to_fp64


# ----------------------------------------------------------------------------- helpers
def randomize_(model):
    """Move every parameter well away from its (often trivial) default so each one matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases, norm weights (default 0 / 1)
                p.add_(0.2 * torch.randn_like(p))
            elif name == "y_embedder.weight":
                p.normal_(0, 0.5)
            else:
                p.add_(0.3 * p.std() * torch.randn_like(p))
    return model


def make_inputs(model, batch=2, height=32, width=48, dtype=torch.float32):
    x = torch.rand(batch, 3, height, width, dtype=dtype) * 2 - 1
    t = torch.rand(batch, dtype=dtype)
    y = torch.randint(0, model.num_classes + 1, (batch,))
    y[-1] = model.num_classes  # always exercise the null class
    return x, t, y


def functional_dip(sd, cfg, x, t, y):
    """The DiP forward written from the spec with torch.nn.functional only, on the state dict's
    tensors (cast to x's dtype). Returns (output image, [tokens after each block])."""
    sd = {k: v.to(x.dtype) for k, v in sd.items()}
    b, ch, height, width = x.shape
    p, d, nh = cfg.patch_size, cfg.hidden_size, cfg.num_heads
    hd = d // nh
    gh, gw = height // p, width // p
    eps = 1e-6

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, C*P*P)
    h = F.linear(patches, sd["x_embedder.weight"], sd["x_embedder.bias"])

    i = torch.arange(128, dtype=x.dtype)
    f = torch.exp(-math.log(10.0) * i / 128)
    arg = t[:, None] * f[None]
    t_freq = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = F.silu(t_emb + sd["y_embedder.weight"][y])

    # 2D RoPE: pair j of a head vector is rotated by pos_x*f[j/2] (even j) or pos_y*f[(j-1)/2] (odd j)
    freqs = 1e4 ** (-4 * torch.arange(hd // 4, dtype=torch.float64) / hd)
    xs, ys = torch.linspace(0, 16, gw, dtype=torch.float64), torch.linspace(0, 16, gh, dtype=torch.float64)
    pos_x = xs.repeat(gh)  # token n = row*gw + col
    pos_y = ys.repeat_interleave(gw)
    angle = torch.empty(gh * gw, hd // 2, dtype=torch.float64)
    for j in range(hd // 2):
        angle[:, j] = pos_x * freqs[j // 2] if j % 2 == 0 else pos_y * freqs[(j - 1) // 2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)

    def rope(v):  # v (B, H, N, hd)
        even, odd = v[..., 0::2], v[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    mlp_hidden = int(2 * int(d * cfg.mlp_ratio) / 3)
    hiddens = []
    for blk in range(cfg.depth):
        w = {k[len(f"blocks.{blk}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{blk}.")}
        sh1, sc1, g1, sh2, sc2, g2 = [m[:, None, :] for m in
                                      F.linear(c, w["adaLN_modulation.weight"], w["adaLN_modulation.bias"]).chunk(6, 1)]
        a = rms(h, w["norm1.weight"]) * (1 + sc1) + sh1
        qkv = F.linear(a, w["attn.qkv.weight"]).reshape(b, gh * gw, 3, nh, hd).permute(2, 0, 3, 1, 4)
        q = rope(rms(qkv[0], w["attn.q_norm.weight"]))
        k = rope(rms(qkv[1], w["attn.k_norm.weight"]))
        att = F.scaled_dot_product_attention(q, k, qkv[2]).transpose(1, 2).reshape(b, gh * gw, d)
        h = h + g1 * F.linear(att, w["attn.proj.weight"], w["attn.proj.bias"])
        a = rms(h, w["norm2.weight"]) * (1 + sc2) + sh2
        w1, w3 = w["mlp.w13.weight"][:mlp_hidden], w["mlp.w13.weight"][mlp_hidden:]
        h = h + g2 * F.linear(F.silu(F.linear(a, w1)) * F.linear(a, w3), w["mlp.w2.weight"])
        hiddens.append(h)

    s = F.silu(t_emb[:, None, :] + h)
    if cfg.head == "patch_detailer":
        hw = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}

        def conv(name, v, pad):
            return F.conv2d(v, hw[name + ".weight"], hw[name + ".bias"], padding=pad)

        v = patches.reshape(b * gh * gw, ch, p, p)
        skips = []
        for lvl in (1, 2, 3, 4):
            v = F.silu(conv(f"enc{lvl}", v, 1))
            skips.append(v)
            v = F.max_pool2d(v, kernel_size=2, stride=2)
        token = s.reshape(b * gh * gw, d, 1, 1).repeat(1, 1, p // 16, p // 16)
        v = F.silu(conv("bottleneck", torch.cat([v, token], 1), 0))
        for lvl in (4, 3, 2, 1):
            v = F.conv_transpose2d(v, hw[f"up{lvl}.weight"], hw[f"up{lvl}.bias"], stride=2)
            v = F.silu(conv(f"dec{lvl}", torch.cat([v, skips[lvl - 1]], 1), 1))
        out = conv("out", v, 0).reshape(b, gh * gw, ch * p * p)
    elif cfg.head == "none":
        shift, scale = F.linear(c, sd["head.adaLN_modulation.weight"], sd["head.adaLN_modulation.bias"]).chunk(2, 1)
        v = F.layer_norm(h, (d,), eps=eps) * (1 + scale[:, None]) + shift[:, None]
        out = F.linear(v, sd["head.linear.weight"], sd["head.linear.bias"])
    else:
        raise NotImplementedError(cfg.head)
    img = F.fold(out.transpose(1, 2), (height, width), kernel_size=p, stride=p)
    return img, hiddens


def official_names(sd, cfg):
    """Our state dict under the official repository's parameter names (the inverse mapping)."""
    hidden = int(2 * int(cfg.hidden_size * cfg.mlp_ratio) / 3)
    seq_convs = {"enc1", "enc2", "enc3", "enc4", "bottleneck", "dec4", "dec3", "dec2", "dec1"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "x_embedder":
            out["s_embedder.proj." + parts[1]] = v
        elif k == "y_embedder.weight":
            out["y_embedder.embedding_table.weight"] = v
        elif parts[0] == "blocks" and parts[2] == "adaLN_modulation":
            out[f"blocks.{parts[1]}.adaLN_modulation.0.{parts[3]}"] = v
        elif parts[0] == "blocks" and parts[2:4] == ["mlp", "w13"]:
            out[f"blocks.{parts[1]}.mlp.w1.weight"] = v[:hidden].clone()
            out[f"blocks.{parts[1]}.mlp.w3.weight"] = v[hidden:].clone()
        elif parts[0] == "head":
            name = "out_conv" if parts[1] == "out" else parts[1] + (".0" if parts[1] in seq_convs else "")
            out[f"local_decoder.{name}.{parts[2]}"] = v
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- 1. sizes
def test_parameter_counts_match_the_paper_xl():
    with torch.device("meta"):
        unet = models.DiPXL16()
        plain = models.DiPXL16(head="none")
    assert sum(p.numel() for p in unet.parameters()) == 631_989_411
    assert sum(p.numel() for p in plain.parameters()) == 628_563_360
    head_names = {"head." + n for n in dip_kernels.DETAILER_WEIGHT_NAMES}
    assert head_names == {k for k in unet.state_dict() if k.startswith("head.")}


def test_scaled_dit_baseline_is_the_papers_1_1b():
    """The paper's Table 2 baseline: the DiT scaled to 1.1B parameters (hidden 1536), no detail head."""
    with torch.device("meta"):
        model = models.build_model("DiT-1.1B/16")
    assert (model.config.hidden_size, model.config.depth, model.config.head) == (1536, 26, "none")
    assert model.config.hidden_size // model.config.num_heads % 4 == 0  # a head dim 2D RoPE can split
    assert sum(p.numel() for p in model.parameters()) == 1_115_891_328


def test_configs_and_build_model():
    with torch.device("meta"):
        for name, ctor in models.CONFIGS.items():
            model = models.build_model(name, num_classes=7)
            assert model.config.num_classes == 7 and model.y_embedder.num_embeddings == 8
            assert type(model.config) is models.DiPConfig
        cfg = models.DiPConfig(hidden_size=64, depth=1, num_heads=4, head="mlp")
        assert models.build_model(cfg, depth=3).config.depth == 3
        assert models.DiPXL32().config.patch_size == 32
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("DiP-H/16")
    with pytest.raises(ValueError, match="head"):
        models.DiPTiny(head="conv")
    with pytest.raises(ValueError, match="unknown config fields"):
        models.DiPTiny(width=3)
    with pytest.raises(ValueError, match="patch_size"):
        models.DiPTiny(patch_size=8)  # the Patch Detailer Head needs 16 or 32


# ----------------------------------------------------------------------------- 2/3. vs functional
def _check_against_functional(model, x, t, y):
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out, hid = model(x, t, y, return_hidden_at=1)
    ref32, hids32 = functional_dip(sd, cfg, x, t, y)
    ref64, hids64 = functional_dip(sd, cfg, x.double(), t.double(), y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close_to_fp64(out, ref32, ref64, name="output")
    assert_close_to_fp64(hid, hids32[0], hids64[0], name="hidden after block 1")

    # backward: gradients w.r.t. the input image and every parameter
    x = x.clone().requires_grad_(True)
    weight = torch.randn_like(out)
    model.zero_grad()
    (model(x, t, y) * weight).sum().backward()
    names = [n for n, _ in model.named_parameters()]

    def ref_grads(dtype):
        leaves = {n: sd[n].to(dtype).requires_grad_(True) for n in names}
        xx = x.detach().to(dtype).requires_grad_(True)
        img, _ = functional_dip({**sd, **leaves}, cfg, xx, t.to(dtype), y)
        grads = torch.autograd.grad((img * weight.to(dtype)).sum(), [xx, *leaves.values()])
        return dict(zip(["x", *names], grads))

    g32, g64 = ref_grads(torch.float32), ref_grads(torch.float64)
    got = {"x": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    for n in g64:
        assert got[n] is not None, f"no gradient for {n}"
        assert g64[n].abs().max() > 0, f"{n} does not influence the output"
        assert_close_to_fp64(got[n], g32[n], g64[n], name=f"grad {n}", factor=4.0)


@pytest.mark.parametrize("head", ["patch_detailer", "none"])
def test_forward_and_backward_match_functional_spec(head):
    model = randomize_(models.DiPTiny(head=head))
    x, t, y = make_inputs(model, height=32, width=48)  # non-square 2x3 patch grid
    _check_against_functional(model, x, t, y)


def test_float64_model_matches_functional_spec():
    # the fused ops compute in float32 internally, so a float64 model is float32-accurate
    model = randomize_(models.DiPTiny()).double()
    x, t, y = make_inputs(model, height=48, width=32, dtype=torch.float64)
    sd = model.state_dict()
    out = model(x, t, y)
    assert out.dtype == torch.float64
    ref32, _ = functional_dip(sd, model.config, x.float(), t.float(), y)
    ref64, _ = functional_dip(sd, model.config, x, t, y)
    assert_close_to_fp64(out, ref32, ref64)


def test_patch32_matches_functional_spec():
    model = randomize_(models.DiPTiny(patch_size=32, hidden_size=32, num_heads=2, depth=1))
    x, t, y = make_inputs(model, batch=2, height=64, width=32)
    _check_against_functional(model, x, t, y)


# ----------------------------------------------------------------------------- 4. heads
def test_unet_is_the_patch_detailer_heads_earlier_name():
    cfg = models.DiPConfig(hidden_size=64, depth=1, num_heads=4, head="unet")
    assert cfg.head == "patch_detailer" and cfg == models.DiPConfig(hidden_size=64, depth=1, num_heads=4)
    assert isinstance(models.DiPTiny(head="unet").head, models.PatchDetailerHead)
    saved = dict(dataclasses.asdict(cfg), head="unet")  # a checkpoint written before the rename
    assert models.canonical_model_config(saved) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("head", models.HEADS)
def test_every_head_runs_forward_and_backward(head):
    model = randomize_(models.DiPTiny(head=head))
    x, t, y = make_inputs(model, height=16, width=32)
    x.requires_grad_(True)
    out, hidden = model(x, t, y, return_hidden_at=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert hidden.shape == (2, 2, model.hidden_size)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{head}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{head}: non-finite gradient for {name}"
        if name.startswith("head."):
            assert p.grad.abs().max() > 0, f"{head}: {name} gets a zero gradient"


def test_autocast_keeps_residual_stream_float32():
    model = randomize_(models.DiPTiny())
    x, t, y = make_inputs(model)
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, hidden = model(x, t, y, return_hidden_at=2)
    assert out.dtype == torch.float32 and hidden.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()


def test_rope_tables_are_cached_outside_the_state_dict():
    model = models.DiPTiny()
    x, t, y = make_inputs(model, height=32, width=48)
    with torch.inference_mode():  # sampling first must not spoil the cache for training
        model(x, t, y)
    model(x, t, y).mean().backward()
    assert list(model._rope_cache) == [(2, 3, x.device)]
    assert not any("rope" in k for k in model.state_dict())
    cos, sin = model._rope_cache[(2, 3, x.device)]
    assert not cos.is_inference()
    exp_cos, exp_sin = dip_kernels.rope_table(2, 3, 16)
    torch.testing.assert_close(cos, exp_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, exp_sin, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 5. official weights
@pytest.mark.parametrize("wrap", ["plain", "ddp_ema", "lightning"])
def test_load_official_state_dict(wrap):
    source = randomize_(models.DiPTiny())
    official = official_names(source.state_dict(), source.config)
    assert not any("w13" in k or k.startswith("head.") for k in official)
    if wrap == "ddp_ema":
        official = {"ema": {"module." + k: v for k, v in official.items()}, "step": 3}
    elif wrap == "lightning":  # the official trainer saves both; the EMA copy must win
        official = {"state_dict": {**{"ema_denoiser." + k: v for k, v in official.items()},
                                   **{"denoiser." + k: torch.zeros_like(v) for k, v in official.items()}}}
    target = models.DiPTiny()
    models.load_official_state_dict(target, official)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v, rtol=0, atol=0, msg=k)
    x, t, y = make_inputs(source)
    torch.testing.assert_close(target(x, t, y), source(x, t, y), rtol=0, atol=0)


def test_load_official_state_dict_reports_bad_keys():
    model = models.DiPTiny()
    official = official_names(model.state_dict(), model.config)
    del official["local_decoder.dec2.0.weight"]
    official["final_layer.linear.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['head\.dec2\.weight'\]") as err:
        models.load_official_state_dict(model, official)
    assert "final_layer.linear.weight" in str(err.value)
    official = official_names(model.state_dict(), model.config)
    official["y_embedder.embedding_table.weight"] = torch.zeros(12, model.hidden_size)
    expected = r"shape mismatches \(1\): \['y_embedder\.weight: \(12, 64\) vs model \(11, 64\)"
    with pytest.raises(ValueError, match=expected):
        models.load_official_state_dict(model, official)
    official = official_names(model.state_dict(), model.config)
    del official["blocks.1.mlp.w3.weight"]
    with pytest.raises(ValueError, match="w3"):
        models.load_official_state_dict(model, official)


# ----------------------------------------------------------------------------- 6. input checks
@pytest.mark.parametrize("case, arg", [
    ("x rank 3", "x"), ("x 4 channels", "x"), ("x height 40", "x"), ("x width 20", "x"),
    ("t shape (B, 1)", "t"), ("t wrong batch", "t"), ("t int", "t"),
    ("y shape (B, 1)", "y"), ("y float", "y"), ("y wrong batch", "y"),
    ("hidden 0", "return_hidden_at"), ("hidden 3", "return_hidden_at"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(case, arg):
    model = models.DiPTiny()
    x, t, y = make_inputs(model, height=32, width=32)
    kwargs = {}
    if case == "x rank 3":
        x = x[0]
    elif case == "x 4 channels":
        x = torch.cat([x, x[:, :1]], 1)
    elif case == "x height 40":
        x = torch.zeros(2, 3, 40, 32)
    elif case == "x width 20":
        x = torch.zeros(2, 3, 32, 20)
    elif case == "t shape (B, 1)":
        t = t[:, None]
    elif case == "t wrong batch":
        t = torch.rand(3)
    elif case == "t int":
        t = torch.ones(2, dtype=torch.int64)
    elif case == "y shape (B, 1)":
        y = y[:, None]
    elif case == "y float":
        y = y.float()
    elif case == "y wrong batch":
        y = torch.zeros(1, dtype=torch.int64)
    else:
        kwargs["return_hidden_at"] = int(case.split()[-1])
    with pytest.raises(ValueError, match=rf"^{arg} "):
        model(x, t, y, **kwargs)


# ----------------------------------------------------------------------------- 7. torch.compile
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = randomize_(models.DiPTiny())
    x, t, y = make_inputs(model, height=32, width=48)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, t, y)  # empty RoPE cache: the table is built inside the graph
    torch.testing.assert_close(out, model(x, t, y))
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x, t, y).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    # the eager call filled the cache; a new grid recompiles without a graph break
    x2 = torch.rand(2, 3, 48, 32) * 2 - 1
    torch.testing.assert_close(compiled(x2, t, y), model(x2, t, y))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- 8. checkpointing
def test_grad_checkpointing_gives_the_same_gradients():
    model = randomize_(models.DiPTiny())
    x, t, y = make_inputs(model)

    def grads():
        model.zero_grad()
        out, hidden = model(x, t, y, return_hidden_at=1)
        (out.square().mean() + hidden.mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, g_plain = grads()
    model.set_grad_checkpointing(True)
    out_ckpt, g_ckpt = grads()
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-6, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_model_matches_functional_spec_and_runs_bf16():
    model = randomize_(models.DiPTiny()).cuda()
    x, t, y = (v.cuda() for v in make_inputs(model, batch=2, height=64, width=96))
    sd = model.state_dict()
    out = model(x, t, y)
    ref32, _ = functional_dip(sd, model.config, x, t, y)
    ref64, _ = functional_dip(sd, model.config, x.double(), t.double(), y)
    # TF32 / kernel reduction orders: allow a few times the eager float32 error
    assert_close_to_fp64(out, ref32, ref64, factor=8.0, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_bf16, hidden = model(x, t, y, return_hidden_at=1)
    assert out_bf16.dtype == torch.float32 and hidden.dtype == torch.float32
    assert (out_bf16 - ref64).abs().max() <= 0.1 * ref64.abs().max()
    out_bf16.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
