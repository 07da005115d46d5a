"""cofi's shared vocabulary, in one place: mask group names and shapes, the activation table, and
the parameter-counting formulas. Imports nothing from cofi, so every layer (ops, masks, models,
pruning, runtime, training) can use it.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------- mask groups
# The five CoFi mask groups, in canonical order (the order of MaskSet's flat buffer, of the
# hard_concrete_step op's offsets and of the native kernels' arguments):
#   hidden [d]: residual dims; head [L, H]: attention heads; mha [L]: attention-sublayer gates;
#   intermediate [L, F]: FFN units; ffn [L]: FFN-sublayer gates.
GROUPS: tuple[str, ...] = ("hidden", "head", "mha", "intermediate", "ffn")

# The CoFi reference's names for the same groups (its ``zs`` dict) -> ours.
REFERENCE_Z_NAMES: dict[str, str] = {"hidden_z": "hidden", "head_z": "head", "head_layer_z": "mha",
                                     "intermediate_z": "intermediate", "mlp_z": "ffn"}


def group_shapes(num_layers: int, hidden_size: int, num_heads: int,
                 intermediate_size: int) -> dict[str, tuple[int, ...]]:
    """Shape of every group, in ``GROUPS`` order: hidden (d,), head (L, H), mha (L,),
    intermediate (L, F), ffn (L,)."""
    L, d, H, F = num_layers, hidden_size, num_heads, intermediate_size
    return {"hidden": (d,), "head": (L, H), "mha": (L,), "intermediate": (L, F), "ffn": (L,)}


def group_shape(group: str, num_layers: int, hidden_size: int, num_heads: int,
                intermediate_size: int) -> tuple[int, ...]:
    """Shape of one group (see ``group_shapes``); KeyError for an unknown group."""
    return group_shapes(num_layers, hidden_size, num_heads, intermediate_size)[group]


# ---------------------------------------------------------------------------- activations
# The cofi ops' activations; the position is the native kernels' activation code (gelu=0,
# gelu_tanh=1, relu=2).
OP_ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "relu")

# transformers' ``hidden_act`` name -> the cofi op's activation (transformers/activations.py):
#   gelu: GELUActivation = F.gelu (erf, exact).
#   gelu_new: NewGELUActivation, gelu_pytorch_tanh: GELUTanh = F.gelu(approximate="tanh"),
#   gelu_fast: FastGELUActivation 0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2))): all the tanh
#   approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (gelu_fast writes sqrt(2/pi) to
#   10 digits: the same function to float rounding). "gelu_tanh" is cofi's own name for it.
#   relu: nn.ReLU.
HF_ACTIVATIONS: dict[str, str] = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                                  "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh", "relu": "relu"}


# Gated FFN activations, down(gate_fn(gate(x)) * up(x)): the op's name -> the gate's function. The
# gate functions' positions are the gated native kernels' codes (gelu=0, gelu_tanh=1, relu=2, silu=3;
# the first three as OP_ACTIVATIONS). silu(h) = h sigmoid(h) (Llama's SwiGLU).
GATE_FUNCTIONS: tuple[str, ...] = OP_ACTIVATIONS + ("silu",)
GATED_ACTIVATIONS: dict[str, str] = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}

# transformers' ``hidden_act`` of a gated MLP (LlamaMLP and its kin: act_fn(gate_proj(x)) * up_proj(x))
# -> the cofi op's gated activation ("silu" and "swish" are nn.SiLU; the gelu names as HF_ACTIVATIONS).
HF_GATED_ACTIVATIONS: dict[str, str] = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_new": "geglu_tanh",
                                        "gelu_pytorch_tanh": "geglu_tanh", "gelu_fast": "geglu_tanh",
                                        "gelu_tanh": "geglu_tanh", "relu": "reglu"}


def gated_op_activation(hidden_act: str, who: str = "cofi") -> str:
    """The cofi op's gated activation for a gated MLP's HF ``hidden_act`` (ValueError naming ``who``
    when the name is not supported)."""
    if not isinstance(hidden_act, str) or hidden_act not in HF_GATED_ACTIVATIONS:
        raise ValueError(f"{who}: hidden_act must be one of {sorted(HF_GATED_ACTIVATIONS)}, got {hidden_act!r}")
    return HF_GATED_ACTIVATIONS[hidden_act]


def op_activation(hidden_act: str, who: str = "cofi") -> str:
    """The cofi op's activation for an HF ``hidden_act`` name (ValueError naming ``who`` when the
    name is not supported)."""
    if not isinstance(hidden_act, str) or hidden_act not in HF_ACTIVATIONS:
        raise ValueError(f"{who}: hidden_act must be one of {sorted(HF_ACTIVATIONS)}, got {hidden_act!r}")
    return HF_ACTIVATIONS[hidden_act]


# ---------------------------------------------------------------------------- parameter counting
# Exact counts of what a (pruned) encoder layer holds, with d the (kept) hidden size. LayerNorm
# weights and biases (2 d per sublayer) are counted only with ``layer_norm=True`` (the paper's
# encoder count, docs/cofi-reference.md 4.5, includes them; the masks' prunable size does not).

def attention_params(hidden: int, heads: int, head_dim: int, layer_norm: bool = False) -> int:
    """An attention sublayer with ``heads`` heads: Q, K, V, O weights (4 d w), Q, K, V biases (3 w)
    and b_O (d; kept with 0 heads: the sublayer then adds its bias), w = heads * head_dim."""
    w = heads * head_dim
    return 4 * w * hidden + 3 * w + hidden + (2 * hidden if layer_norm else 0)


def ffn_params(hidden: int, units: int, layer_norm: bool = False) -> int:
    """An FFN sublayer with ``units`` units: W_1, W_2 (2 d f), b_1 (f) and b_2 (d)."""
    return 2 * units * hidden + units + hidden + (2 * hidden if layer_norm else 0)


def layer_params(hidden: int, num_heads: int, head_dim: int, intermediate: int, layer_norm: bool = False) -> int:
    """One full encoder layer (attention + FFN). BERT-base: 7,084,800 without LayerNorms,
    7,087,872 with them."""
    return attention_params(hidden, num_heads, head_dim, layer_norm) + ffn_params(hidden, intermediate, layer_norm)


# The CoFi reference's own prunable size M (its l0_module; used by the expected size): per head
# (4 d^2 + 4 d) / H, per FFN layer 2 d F + 5 d (BERT-base M = 85,017,600).

def reference_head_params(hidden: int, num_heads: int) -> float:
    return (4 * hidden * hidden + 4 * hidden) / num_heads


def reference_ffn_layer_params(hidden: int, intermediate: int) -> int:
    return 2 * hidden * intermediate + 5 * hidden


__all__ = [
    "GATED_ACTIVATIONS", "GATE_FUNCTIONS", "GROUPS", "HF_ACTIVATIONS", "HF_GATED_ACTIVATIONS", "OP_ACTIVATIONS", "REFERENCE_Z_NAMES", "attention_params", "ffn_params",
    "gated_op_activation", "group_shape", "group_shapes", "layer_params", "op_activation", "reference_ffn_layer_params",
    "reference_head_params",
]


# ---------------------------------------------------------------------------- precision
# Run / inference precision names (``precision`` of a training config, ``cofi eval --precision``) ->
# the torch dtype attribute: fp32 runs as is; bf16 / fp16 train under autocast with fp32 master
# weights (cofi.training.precision) and run a compact model cast to that dtype (cofi.runtime).
PRECISION_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ---------------------------------------------------------------------------- decoder (Llama family)
# Mask groups of a Llama-family causal LM (cofi.models.llama), in canonical order:
#   hidden [d]: residual dims; head [L, H]: query heads; kv [L, G]: K/V groups (G = num_key_value_heads,
#   query head h belongs to group h // (H / G), as transformers' repeat_kv); mha [L]: attention-sublayer
#   gates; intermediate [L, F]: SwiGLU units (gate/up rows, down columns); ffn [L]: MLP-sublayer gates.
# GQA rule (docs/decoder.md): query head h acts with head[l, h] * kv[l, g(h)]; a K/V group is kept iff
# its kv value and at least one of its query heads' values are nonzero.
DECODER_GROUPS: tuple[str, ...] = ("hidden", "head", "kv", "mha", "intermediate", "ffn")


def decoder_group_shapes(num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int,
                         intermediate_size: int) -> dict[str, tuple[int, ...]]:
    """Shape of every decoder group, in ``DECODER_GROUPS`` order: hidden (d,), head (L, H),
    kv (L, G), mha (L,), intermediate (L, F), ffn (L,)."""
    L, d, H, G, F = num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size
    return {"hidden": (d,), "head": (L, H), "kv": (L, G), "mha": (L,), "intermediate": (L, F), "ffn": (L,)}


# Parameter counts of a (pruned) decoder layer as the model holds them, d the kept hidden size. They
# are polynomials, so expected counts (keep probabilities in place of counts) use the same formulas.

def decoder_attention_params(hidden, q_heads, kv_heads, head_dim: int, qkv_bias: bool, o_bias: bool, norm=1):
    """An attention sublayer with ``q_heads`` query and ``kv_heads`` K/V heads and its input RMSNorm:
    q_proj and o_proj (2 d q D), k_proj and v_proj (2 d k D), q/k/v biases ((q + 2 k) D, Qwen2 and
    Llama attention_bias), o bias (d, Llama attention_bias) and the RMSNorm weight (d * ``norm``; a
    sublayer left with no head but an o bias holds the bias only: norm = 0)."""
    return (2 * hidden * (q_heads + kv_heads) * head_dim + (q_heads + 2 * kv_heads) * head_dim * int(qkv_bias)
            + hidden * int(o_bias) + hidden * norm)


def decoder_mlp_params(hidden, units, bias: bool, norm=1):
    """A SwiGLU MLP sublayer with ``units`` units and its input RMSNorm: gate/up/down (3 d f),
    gate/up/down biases (2 f + d, Llama mlp_bias) and the RMSNorm weight (d * ``norm``; 0 units with
    a down bias: the bias only, norm = 0)."""
    return 3 * hidden * units + (2 * units + hidden) * int(bias) + hidden * norm


def decoder_embedding_params(vocab_size: int, hidden, tied: bool) -> tuple[object, object]:
    """(token embedding V d, LM head: V d, or 0 when tied to the embedding), stated apart from the
    decoder body (layers + final RMSNorm d)."""
    return vocab_size * hidden, 0 if tied else vocab_size * hidden


__all__ += ["DECODER_GROUPS", "decoder_attention_params", "decoder_embedding_params", "decoder_group_shapes",
            "decoder_mlp_params"]
