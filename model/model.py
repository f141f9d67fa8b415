"""DiffusionGemma's text model in plain PyTorch: the reference every kernel, export and engine is checked against.

One set of weights runs in two modes. `encode` is a causal pass that commits its tokens' K/V to the cache (the
prompt, then each finished canvas); `decode` is a bidirectional pass over a canvas that reads the cache and writes
nothing lasting, and `denoise` adds the tied LM head. A pass, step by step (the numbers mark the code):

     1. embed: E[ids] * sqrt(D), the scale rounded to the weight dtype; the decoder adds the previous step's soft
        embedding through the self-conditioning GeGLU, then a weightless RMSNorm.
   Every layer, after the input RMSNorm:
   2-3. q, k, v projections; full-attention layers have no v_proj: V is the raw K projection.
     4. q and k RMSNorm (times w, not 1 + w), V's weightless RMSNorm, split-half RoPE (proportional on full layers:
        only the first quarter of the pairs rotates).
     5. the chunk's K/V go into the cache (`Pass.attend`).
   6-8. attention with score scale 1.0 and no softcap, an fp32 softmax, over the keys the layer type and mode allow:
        causal or bidirectional, a sliding window or all committed keys.
     9. the output projection.
    10. post-attention RMSNorm, residual.
    11. the dense GeGLU MLP between its two RMSNorms.
    12. the router on the un-normalized residual: weightless RMSNorm * scale * D^-1/2, a softmax over all experts,
        top-k renormalized, * per-expert scale.
    13. each chosen expert's GeGLU on the pre-normalized residual, weighted by the router in fp32.
 14-15. the expert sum's RMSNorm, then the RMSNorm of dense + experts, residual.
    16. times the mode's layer scalar (the encoder and the decoder keep separate ones).
   Then the final RMSNorm; the logits are E @ h soft-capped at 30 in fp32.

The fused Triton layers (fused.py) and fp8 expert storage (fp8.py) subclass the layers here and are swapped in when a
checkpoint loads (load.py); the export graphs run these same layers through their own `Pass`.

Legend: B batch, T tokens, C canvas, D hidden, H query heads, Hkv KV heads, d head dim, S cache slots, V vocab,
E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DgemmaError
from .cache import KVCache
from .checkpoint import checkpoint_folder, read_config, read_weights
from .config import SLIDING, WINDOW_MODES, Config


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma-4 RMSNorm in fp32: multiplies by w, not 1 + w; weightless when `weight` is None."""
    return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(config: Config, kind: str) -> torch.Tensor:
    """Split-half RoPE frequencies; proportional RoPE rotates the first 25% of pairs over the full head_dim."""
    d, rope = config.head_dim_of(kind), config.rope_parameters[kind]
    theta, factor = rope["rope_theta"], rope.get("partial_rotary_factor", 1.0)
    if rope["rope_type"] == "proportional":
        pairs = int(factor * d // 2)
        rotated = 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float, device="cpu") / d)
        return torch.cat([rotated, torch.zeros(d // 2 - pairs, device="cpu")]) / rope.get("factor", 1.0)
    dim = int(d * factor)
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)


def apply_rope(x, cos, sin):
    """x (B, T, H, d); cos, sin (T, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention(q, k, v, mask):
    """Score scale 1.0, no softcap, a softmax over the keys `mask` allows: q (B, H, T, d); k, v (B, Hkv, S, d);
    mask (B, 1, T, S) bool. A masked score gets the dtype's least finite value, not -inf, so a query that sees no key
    (a left-padding row) averages the values instead of turning NaN. Query head h reads KV head h // (H / Hkv)."""
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, config: Config, layer: int):
        super().__init__()
        kind = config.layer_types[layer]
        D, H = config.hidden_size, config.num_attention_heads
        Hkv, d = config.num_kv_heads(kind), config.head_dim_of(kind)
        self.layer, self.kind, self.head_dim, self.eps = layer, kind, d, config.rms_norm_eps
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False) if kind == SLIDING else None  # full layers: V = raw K
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.q_norm = RMSNorm(d, self.eps)
        self.k_norm = RMSNorm(d, self.eps)

    def project(self, x):
        """Steps 2-3: the raw q, k, v projections (B, T, heads, d); full layers' V is the raw K."""
        B, T, _ = x.shape
        shape = (B, T, -1, self.head_dim)
        q_raw, k_raw = self.q_proj(x).view(shape), self.k_proj(x).view(shape)
        return q_raw, k_raw, self.v_proj(x).view(shape) if self.v_proj is not None else k_raw

    def key_value(self, k_raw, v_raw, p: Pass):
        """Step 4 for the keys and values: K normed and rotated, V's weightless norm, (B, T, Hkv, d)."""
        return p.rotate(self.kind, self.k_norm(k_raw)), rms_norm(v_raw, None, self.eps)

    def forward(self, x, p: Pass):
        B, T, _ = x.shape
        q_raw, k_raw, v_raw = self.project(x)  # 2, 3
        q = p.rotate(self.kind, self.q_norm(q_raw))  # 4
        k, v = self.key_value(k_raw, v_raw, p)
        o = p.attend(self.layer, self.kind, q, k, v)  # 5-8: (B, T, H, d)
        return self.o_proj(o.reshape(B, T, -1))  # 9


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.top_k, self.eps, self.root = config.top_k_experts, config.rms_norm_eps, config.hidden_size**-0.5
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, r):
        """r (T, D), the un-normalized residual -> routing weights (T, K) fp32 and expert ids (T, K)."""
        z = rms_norm(r, None, self.eps) * self.scale * self.root  # 12
        probs = self.proj(z).softmax(-1, dtype=torch.float32)  # over all E experts
        weights, idx = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[idx], idx


MIN_ROWS = 4  # CPU BLAS takes another kernel below 4 rows, whose sums round differently


def moe(x, weights, idx, gate_up_proj, down_proj):
    """Reference MoE, one expert at a time. x (T, D); gate_up_proj (E, 2I, D) rows [gate; up]; down_proj (E, D, I).

    Each choice's output is scaled by its fp32 routing weight and summed over the K choices in fp32. An expert's rows
    are padded to MIN_ROWS, so a token's output never depends on how many other tokens chose its expert (batch
    invariance: the same request gives the same tokens alone or batched with others).
    """
    T, K = idx.shape
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate_up_proj.shape[0]).tolist()  # one host sync per layer
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    for e, rows in enumerate(order.split(counts)):
        if rows.numel() == 0:
            continue
        tok = rows // K
        xs = F.pad(x[tok], (0, 0, 0, max(0, MIN_ROWS - len(tok))))
        gate, up = F.linear(xs, gate_up_proj[e]).chunk(2, dim=-1)  # 13
        y = F.linear(gelu_tanh(gate) * up, down_proj[e])[: len(tok)]
        out.index_add_(0, tok, y.float() * weights.flatten()[rows, None])
    return out.to(x.dtype)


class Experts(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        E, I, D = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x, weights, idx):
        return moe(x, weights, idx, self.gate_up_proj, self.down_proj)


class Layer(nn.Module):
    def __init__(self, config: Config, layer: int):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.kind = config.layer_types[layer]
        self.self_attn = Attention(config, layer)
        self.input_layernorm = RMSNorm(D, eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.mlp = GatedMLP(D, config.intermediate_size)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(D, eps)
        self.router = Router(config)
        self.experts = Experts(config)
        self.pre_feedforward_layernorm_2 = RMSNorm(D, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(D, eps)
        self.post_feedforward_layernorm = RMSNorm(D, eps)
        # The two modes keep separate layer scalars (the checkpoint stores both sets).
        self.register_buffer("encoder_scalar", torch.ones(1))
        self.register_buffer("decoder_scalar", torch.ones(1))

    def forward(self, x, p: Pass, decoder: bool):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), p))  # 10
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))  # 11
        flat = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(flat)  # 12
        experts = self.experts(self.pre_feedforward_layernorm_2(flat), weights, idx).view_as(x)  # 13
        experts = self.post_feedforward_layernorm_2(experts)  # 14
        x = x + self.post_feedforward_layernorm(dense + experts)  # 15
        return x * (self.decoder_scalar if decoder else self.encoder_scalar)  # 16


def embedding_scale(table: torch.Tensor) -> torch.Tensor:
    """sqrt(D), cast to the table's dtype first: 53.0 in bf16, not 53.066."""
    return torch.tensor(table.shape[1] ** 0.5, dtype=table.dtype)


def soft_embedding(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """softmax(logits) @ E * sqrt(D): the expected embedding under the previous step's distribution. (..., V) ->
    (..., D) in the table's dtype."""
    return expected_embedding(logits.softmax(-1, dtype=torch.float32), table)


def expected_embedding(probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """probs (..., V) fp32 -> probs @ E * sqrt(D) (..., D), the probabilities rounded to the table's dtype first."""
    return (probs.to(table.dtype) @ table) * embedding_scale(table)


def soft_capped_logits(h: torch.Tensor, table: torch.Tensor, cap: float, out: torch.Tensor | None = None):
    """The tied LM head: (..., D) -> fp32 logits (..., V), soft-capped to (-cap, cap): cap * tanh(logits / cap).
    Without autograd, in place on one (..., V) tensor (`out`, if given and the table is fp32)."""
    if torch.is_grad_enabled():  # training: tanh's backward needs its output intact
        return cap * torch.tanh(F.linear(h, table).float() / cap)
    if out is not None and table.dtype == torch.float32:
        logits = torch.matmul(h, table.t(), out=out)
    else:
        logits = F.linear(h, table).float()
    return logits.div_(cap).tanh_().mul_(cap)


class SelfConditioning(GatedMLP):
    """Adds the previous step's soft embedding (through a GeGLU) to the canvas embedding, then a weightless norm."""

    def __init__(self, config: Config):
        super().__init__(config.hidden_size, config.intermediate_size)
        self.eps = config.rms_norm_eps
        self.pre_norm = RMSNorm(config.hidden_size, self.eps)

    def forward(self, embedded, soft):
        return rms_norm(embedded + super().forward(self.pre_norm(soft)), None, self.eps)


class DiffusionGemma(nn.Module):
    decoder_output = "hidden"  # what `decode` returns: the final hidden states, for the fused vocabulary pass
    backend = "torch"  # "triton" once fused.use_kernels has swapped in the kernel-backed layers (a label)
    device_loop = False  # whether the sync-free DeviceLoop suits this model: true for the kernel-backed layers

    def __init__(self, config: Config, window: str = "shared"):
        super().__init__()
        if window not in WINDOW_MODES:
            raise DgemmaError(f"window must be one of {WINDOW_MODES}, not {window!r}")
        self.config, self.window = config, window
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # tied LM head
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        for kind in set(config.layer_types):
            self.register_buffer(f"inv_freq_{kind}", rope_inv_freq(config, kind), persistent=False)

    @classmethod
    def from_pretrained(cls, path, *, dtype=torch.bfloat16, device="cpu", window="shared", transform=None):
        """An official checkpoint folder, unchanged (checkpoint.py), built on the meta device and loaded memory-mapped;
        `transform(name, tensor)` may convert each weight as it loads. load.py's `load_model` adds the fused layers
        and fp8 expert storage."""
        folder, device = checkpoint_folder(path, dtype, device)
        with torch.device("meta"):
            model = cls(read_config(folder), window=window)
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        state = read_weights(folder, shapes, dtype=dtype, device=device, transform=transform)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval()

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.embed_tokens.weight.device

    def inv_freq(self, kind: str) -> torch.Tensor:
        return getattr(self, f"inv_freq_{kind}")

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, dtype=self.dtype, device=self.device, window=self.window)

    def embed(self, ids):
        return self.embed_tokens(ids) * embedding_scale(self.embed_tokens.weight)

    def soft_embedding(self, logits):
        return soft_embedding(logits, self.embed_tokens.weight)

    def forward(self, x, p: Pass, decoder: bool):
        """The layers and the final norm over embedded tokens x (B, T, D), their K/V reached through `p`."""
        for layer in self.layers:
            x = layer(x, p, decoder)
        return self.norm(x)

    def encode(self, ids, cache: KVCache, attention_mask=None):
        """Causal pass that commits `ids` (B, T) to the cache, in chunks of the canvas length; returns (B, T, D)."""
        check_ids(ids, self.config.vocab_size, cache, "ids")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape):
            shapes = f"attention_mask {tuple(attention_mask.shape)}, ids {tuple(ids.shape)}"
            raise DgemmaError(f"the attention mask must have the shape of the ids: {shapes}")
        out = []
        for start in range(0, ids.shape[1], cache.chunk):
            chunk = ids[:, start : start + cache.chunk]
            valid = None if attention_mask is None else attention_mask[:, start : start + cache.chunk]
            out.append(self(self.embed(chunk), CachePass(self, cache, chunk.shape[1], valid, causal=True), False))
            cache.commit(chunk.shape[1])
        return torch.cat(out, dim=1)

    def denoise(self, canvas_ids, cache: KVCache, self_conditioning=None):
        """Bidirectional pass over the canvas (B, C) after the committed prefix -> fp32 soft-capped logits (B, C, V).

        `self_conditioning` is the previous step's processed (temperature-scaled) logits; None at a canvas's first step.
        Checks the ids (one host sync); the generation loops' own passes go through `decode`, which does not.
        """
        check_ids(canvas_ids, self.config.vocab_size, cache, "canvas_ids", self.config.canvas_length)
        soft = None if self_conditioning is None else self.soft_embedding(self_conditioning)
        return self.logits(self.decode(canvas_ids, cache, soft))

    def decode(self, canvas_ids, cache: KVCache, soft=None):
        """The decoder pass up to the final norm -> (B, C, D), for the fused vocabulary pass (kernels/vocab.py).

        `soft` is the self-conditioning soft embedding (B, C, D) of the previous step; None (zero) at a canvas's start.
        """
        embedded = self.embed(canvas_ids)  # 1
        soft = torch.zeros_like(embedded) if soft is None else soft
        x = self.self_conditioning(embedded, soft)
        return self(x, CachePass(self, cache, canvas_ids.shape[1], None, causal=False), True)

    def logits(self, h, out=None):
        return soft_capped_logits(h, self.embed_tokens.weight, self.config.final_logit_softcapping, out)


class Pass:
    """How the layers of one pass reach keys and values: `rotate` applies RoPE at the chunk's positions and `attend`
    stores the chunk's K/V and attends (steps 5-8). Subclasses say where K/V live: CachePass in the model's ring
    cache; the export graphs take the committed prefix as graph inputs."""

    def rotate(self, kind: str, x):
        raise NotImplementedError

    def attend(self, layer: int, kind: str, q, k, v):
        raise NotImplementedError


class CachePass(Pass):
    """A chunk of T tokens at the cache's committed length: its slots are staged, its K/V written into them; the
    RoPE tables and masks are built once per layer type, on first use (the fused layers read the band instead)."""

    def __init__(self, model: DiffusionGemma, cache: KVCache, T: int, valid, causal: bool):
        self.model, self.cache, self.start, self.T, self.causal = model, cache, cache.length, T, causal
        self.slots = cache.stage(T, valid)
        self._rope, self._mask = {}, {}

    def rotate(self, kind: str, x):
        if kind not in self._rope:
            positions = torch.arange(self.start, self.start + self.T, device=x.device)
            freqs = positions[:, None].float() * self.model.inv_freq(kind)  # fp32 angles, then cast
            angles = torch.cat([freqs, freqs], dim=-1)
            self._rope[kind] = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        return apply_rope(x, *self._rope[kind])

    def attend(self, layer: int, kind: str, q, k, v):
        if kind not in self._mask:
            self._mask[kind] = self.cache.mask(kind, self.T, self.causal)
        end = self.start + self.T
        keys, values = self.cache.write(layer, self.slots[kind], k.transpose(1, 2), v.transpose(1, 2), end)
        return attention(q.transpose(1, 2), keys, values, self._mask[kind]).transpose(1, 2)


def check_ids(ids, vocab_size: int, cache: KVCache, what: str, length: int | None = None) -> None:
    """Token ids (B, T) from outside the model: an integer tensor of the cache's batch (and `length` tokens a row),
    every id a token. On a GPU an out-of-range id would be a device-side assert that poisons the process, so it is
    refused here (one host sync)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        found = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise DgemmaError(f"{what} must be an integer tensor (batch, tokens), not {found}")
    if ids.shape[0] != cache.batch or ids.shape[1] == 0 or ids.shape[1] != (length or ids.shape[1]):
        tokens = "tokens" if length is None else f"{length} tokens (the canvas)"
        raise DgemmaError(f"{what} {tuple(ids.shape)} must hold {cache.batch} row(s) (the cache's batch) of {tokens}")
    low, high = torch.stack(ids.aminmax()).tolist()
    if low < 0 or high >= vocab_size:
        raise DgemmaError(f"{what} holds token ids outside the vocabulary [0, {vocab_size}): {low} to {high}")
